"""``GET /healthz`` on ``metrics_address`` (issue 22): 200 while serving, 503 while a task is failing or the
daemon is stopping; the pure decision table, then a real daemon with injected failures and a real SIGTERM."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

import autosaved
from autosaved.daemon.health import HEALTHY_AFTER, failing_until, health
from autosaved.daemon.runstate import Phase
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, wait_for
from .test_metrics import _free_port


@pytest.mark.parametrize(("phase", "failing", "now", "ok", "why"), [
    (Phase.SERVING, {}, 100.0, True, "serving"),
    (Phase.STARTING, {}, 100.0, False, "starting: not serving"),
    (Phase.FLUSHING, {}, 100.0, False, "flushing: not serving"),
    (Phase.STOPPED, {}, 100.0, False, "stopped: not serving"),
    (Phase.SERVING, {"rpc": 100.5}, 100.0, False, "serving, but task rpc failing"),
    (Phase.SERVING, {"rpc": 100.5, "metrics": 101.0}, 100.0, False, "serving, but tasks metrics, rpc failing"),
    (Phase.SERVING, {"rpc": 99.0}, 100.0, True, "serving"),  # restarted and ran cleanly long enough
])
def test_health_table(phase: Phase, failing: dict[str, float], now: float, ok: bool, why: str) -> None:
    assert health(phase, failing, now) == (ok, why)


def test_a_failed_task_counts_until_it_ran_cleanly_after_its_restart() -> None:
    assert failing_until(50.0, 2.0) == 52.0 + HEALTHY_AFTER


def get(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_of_a_real_daemon(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    # The throttle's task fails at its first start (a bug in one task): unhealthy until it ran cleanly.
    faults.write_text("task.iocontrol.start 1 raise\nmanifest.open.before 1 sleep:3\n")
    port = _free_port()
    d = make_daemon(f'metrics_address = "127.0.0.1:{port}"\n' + NO_AUTO_POLICY,
                    env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    wait_for(lambda: get(port) == (503, "serving, but task iocontrol failing\n"))
    wait_for(lambda: get(port) == (200, "serving\n"), timeout=120)
    # SIGTERM with a dirty job whose save is slowed: the flush answers 503 while it runs.
    with autosaved.Client("h", address=d.address) as c:
        c.update({"x": 1})
    d.send_signal(signal.SIGTERM)
    wait_for(lambda: get(port) == (503, "flushing: not serving\n"), timeout=60)
    assert d.proc is not None and d.proc.wait(60) == 0
