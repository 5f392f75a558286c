"""``logged`` replies sent by the log thread right after the sync (issue 21): the request is still closed on
the event loop afterwards, so per-user accounting stays exact. With ``max_requests = 1`` a client that
sends its next update the moment it has the reply is never refused, and the daemon's in-flight count
returns to zero (a request answered early and closed later must count once, never twice)."""

from __future__ import annotations

from collections.abc import Callable

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY


def test_logged_replies_from_the_log_thread_keep_the_request_quota_exact(
        make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY + "[quota]\nmax_requests = 1\n")
    with autosaved.Client("job", address=d.address) as c:
        for i in range(300):  # back to back: each next request races the close of the one before
            c.update({"i": i, "note": "x" * 100}, wait="logged")
        # a request that waits in a task of its own, after the early-answered ones
        c.update({"i": "last"}, wait="committed")
        assert c.restore()["i"] == "last"
    with autosaved.Admin(address=d.address) as admin:
        daemon = admin.status()["daemon"]
    assert d.proc is not None and d.proc.poll() is None, d.log()[-2000:]
    assert "Traceback" not in d.log(), d.log()[-3000:]
    assert daemon["wal_records"] >= 300
