"""``autosaved top`` (issue 22): one frame is a pure function of a status reply (tested as text), and the
live view is driven in a real terminal (tmux): two jobs, one of them saving, keys to sort and quit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

from rich.console import Console

from autosaved.cli.top import frame
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, finish, skip_or_fail, spawn_python, wait_for

NOW = 1_800_000_000.0


def _job(name: str, **over: Any) -> dict[str, Any]:
    base = {"job": name, "owner": 1000, "dirty": False, "dirty_bytes": 0, "saving": False, "last_save_time": None,
            "last_save_reason": None, "last_save_duration_s": None, "wal_lsn": 0, "last_error": None,
            "wal_error": None}
    return {**base, **over}


STATUS = {
    "daemon": {"version": "0.1.0", "pid": 42, "uptime_s": 3600.0, "saves": 7, "bytes_written": 3 << 30,
               "save_failures": 1, "throttle": {"allowed_rate": 50 << 20}},
    "jobs": [
        _job("alpha", dirty=True, dirty_bytes=5 << 20, last_save_time="2027-01-15T08:00:00+00:00",
             last_save_reason="idle", last_save_duration_s=1.25, wal_lsn=17),
        _job("beta", owner=0, saving=True, save_written=64 << 20, save_rate=32 << 20, dirty=True,
             dirty_bytes=900 << 20, last_error="disk full",
             remote={"backlog_versions": 2, "backlog_bytes": 10 << 20, "replicated_version": 4}),
    ],
}


def text(sort: str = "j", reverse: bool = False) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(frame(STATUS, NOW, sort, reverse))
    return console.export_text()


def test_a_frame_shows_every_column_a_job_has() -> None:
    out = text()
    for word in ("autosaved 0.1.0", "pid 42", "2 jobs", "saves 7 (3.0 GiB)", "write rate 50.0 MiB/s", "JOB v" not in
                 out and "JOB ^", "DIRTY", "LAST SAVE", "REASON", "TOOK", "SAVING", "LOG", "UPLOAD", "REPLICATED",
                 "ERROR", "q quit"):
        assert word is True or word in out, (word, out)
    alpha = next(line for line in out.splitlines() if line.startswith("alpha"))
    assert "5.0 MiB" in alpha and "1.25s" in alpha and "idle" in alpha and "17" in alpha
    beta = next(line for line in out.splitlines() if line.startswith("beta"))
    assert "64.0 MiB @ 32.0 MiB/s" in beta and "2 v, 10.0 MiB" in beta and "disk full" in beta
    assert " 4 " in beta  # the replicated version


def test_sort_keys_order_the_rows() -> None:
    def order(sort: str, reverse: bool = False) -> list[str]:
        return [line.split()[0] for line in text(sort, reverse).splitlines() if line.startswith(("alpha", "beta"))]

    assert order("j") == ["alpha", "beta"]
    assert order("j", reverse=True) == ["beta", "alpha"]
    assert order("d") == ["beta", "alpha"]  # the most unsaved bytes first
    assert order("o") == ["beta", "alpha"]  # uid 0 before 1000
    assert order("e") == ["beta", "alpha"]  # failing jobs first


# A private tmux server (-L): its own window size, never another tmux on the machine.
SERVER = f"autosaved-test-{uuid.uuid4().hex[:8]}"


def tmux(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-L", SERVER, *args], capture_output=True, text=True, timeout=30, check=check)


def _pane(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session, check=False).stdout


def _line(pane: str, job: str) -> str:
    return next((line for line in pane.splitlines() if line.startswith(job)), "")


def _rows(pane: str) -> list[str]:
    return [line.split()[0] for line in pane.splitlines() if line.startswith(("small-job", "big-job"))]


def test_top_in_a_real_terminal(make_daemon: Callable[..., PrivateDaemon]) -> None:
    if shutil.which("tmux") is None:
        skip_or_fail("tmux is not installed (.ci/run installs it)")
    # Saves are held to 2 MiB/s, so a 24 MiB save stays in progress while the test looks at it.
    d = make_daemon(NO_AUTO_POLICY + '[throttle]\nmin_write_rate = "1MiB"\nmax_write_rate = "2MiB"\n')
    saver = spawn_python(f"""
        import numpy as np, autosaved
        with autosaved.Client("small-job", address={d.address!r}) as c:
            c.update({{"w": np.arange(1000.0)}}, step=5, wait="committed")
            c.update({{"x": 1}})
        with autosaved.Client("big-job", address={d.address!r}, save_timeout=600) as c:
            c.update({{"w": np.random.default_rng(0).random(3 << 20)}}, step=100)
            print("saving", flush=True)
            c.save()
    """)
    session = f"top-{uuid.uuid4().hex[:8]}"
    try:
        assert saver.stdout is not None and saver.stdout.readline().strip() == "saving"
        env = f"AUTOSAVED_ADDRESS={d.address} PYTHONPATH={os.environ.get('PYTHONPATH', '')}"
        tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "30",
             f"env -u COLUMNS -u LINES {env} {sys.executable} -m autosaved top")
        # Both jobs, the big one saving with its rate (written @ rate), the small one dirty and saved once.
        def saving_pane() -> str | None:
            pane = _pane(session)
            return pane if " @ " in _line(pane, "big-job") else None

        pane = str(wait_for(saving_pane))
        big, small = _line(pane, "big-job"), _line(pane, "small-job")
        assert " @ " in big and "explicit" in small and "s ago" in small, pane
        assert _rows(pane) == ["big-job", "small-job"]  # sorted by name
        # It refreshes: the big save's written bytes move on.
        wait_for(lambda: _line(_pane(session), "big-job") not in ("", _line(pane, "big-job")))
        tmux("send-keys", "-t", session, "o")
        wait_for(lambda: "OWNER v" in _pane(session) or "OWNER ^" in _pane(session))
        tmux("send-keys", "-t", session, "r")
        wait_for(lambda: "OWNER v" in _pane(session))
        tmux("send-keys", "-t", session, "q")
        wait_for(lambda: tmux("has-session", "-t", session, check=False).returncode != 0)
    finally:
        tmux("kill-server", check=False)
        finish(saver)


def test_top_once_prints_one_frame(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    proc = subprocess.run([sys.executable, "-m", "autosaved", "top", "--once"], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "AUTOSAVED_ADDRESS": d.address, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "0 jobs" in proc.stdout and "(no jobs yet)" in proc.stdout and "\x1b[?1049h" not in proc.stdout
