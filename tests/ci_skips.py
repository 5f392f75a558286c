"""Under CI every skip is a failure: a missing dependency (torch, obstore, SeaweedFS) or a missing
privilege must turn the run red, never leave a guarantee's row silently unproven with the run exiting 0.

CI is ``AUTOSAVED_REQUIRE_ROOT_TESTS=1`` (what ``.ci/run`` exports) or ``CI=true`` (what hosted CI
services set). A developer's machine without them keeps ordinary skips. tests/conftest.py installs these
hooks; tests/test_layout.py runs them in a child pytest to show they turn both kinds of skip (a test's,
and a whole module's at collection) into failures.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest


def require_every_test() -> bool:
    return (os.environ.get("AUTOSAVED_REQUIRE_ROOT_TESTS") == "1"
            or os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"))


def _reason(longrepr: Any) -> str:
    # a skip's longrepr is (path, line, "Skipped: reason")
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and require_every_test():
        report.outcome = "failed"
        report.longrepr = f"skipped under CI, where every test must run: {_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.outcome == "skipped" and require_every_test():
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid} skipped whole under CI, where every test must run: " \
                          f"{_reason(report.longrepr)}"
