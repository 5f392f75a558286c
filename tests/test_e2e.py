"""The whole path with real processes: trainer subprocess, daemon subprocess, real signals, real files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import FAST_POLICY, NO_AUTO_POLICY, first_chunk, run_python, version_files, wait_for

TRAINER = """
import os, signal, numpy as np, autosaved
with autosaved.Client("job1", address={address!r}) as c:
    c.update({{"model": {{"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3)}},
              "progress": {{"stage": "planning", "completed_steps": [], "cache": {{"a": b"x" * 10}}}},
              "scratch": [1, 2, 3]}}, step=1, meta={{"stage": "planning"}})
    c.update({{"progress": {{"stage": "reasoning", "completed_steps": ["plan"], "cache": {{"b": (1, 2.5, None)}}}},
              "scratch": autosaved.DELETE, 7: {{"int-key": True}}}}, step=2, meta={{"stage": "reasoning"}})
    print("acked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""

EXPECTED = {
    "model": {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3)},
    "progress": {"stage": "reasoning", "completed_steps": ["plan"], "cache": {"a": b"x" * 10, "b": (1, 2.5, None)}},
    7: {"int-key": True},
}


def assert_state_equal(got: object, want: object, path: str = "state") -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), path
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{path}: {got!r} vs {want!r}"
        for k in want:
            assert_state_equal(got[k], want[k], f"{path}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want), f"{path}: {got!r} vs {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_state_equal(g, w, f"{path}[{i}]")
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r} vs {want!r}"


def test_killed_trainer_is_saved_by_idle_policy_and_restores_everywhere(
    make_daemon: Callable[..., PrivateDaemon],
) -> None:
    d = make_daemon(FAST_POLICY)
    proc = run_python(TRAINER.format(address=d.address), check=False)
    assert proc.returncode == -signal.SIGKILL and "acked" in proc.stdout, proc.stderr
    # nobody asked for a save: the idle rule (0.2 s) commits the state the dead trainer left
    wait_for(lambda: version_files(d.state_dir, "job1"))
    assert d.stop(signal.SIGTERM) == 0
    assert_state_equal(autosaved.restore("job1", state_dir=d.state_dir), EXPECTED)
    d.start()
    with autosaved.Client("job1", address=d.address) as c:
        assert_state_equal(c.restore(), EXPECTED)
        assert c.status()["step"] == 2


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_commits_every_dirty_job(make_daemon: Callable[..., PrivateDaemon], signum: int) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    for job in ("a", "b", "c"):
        with autosaved.Client(job, address=d.address) as c:
            c.update({"x": np.full(1000, ord(job[0]), dtype=np.int16), "name": job}, step=5)
    assert not any(version_files(d.state_dir, j) for j in "abc")  # policy is off: nothing saved yet
    assert d.stop(signum) == 0
    for job in ("a", "b", "c"):
        state = autosaved.restore(job, state_dir=d.state_dir)
        assert state["name"] == job and (state["x"] == ord(job[0])).all()
    assert "reason\": \"shutdown\"" in version_files(d.state_dir, "a")[-1].read_text()


def test_daemon_restart_is_never_silent(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    c = autosaved.Client("live", address=d.address, timeout=60)
    c.connect()
    c.update({"a": 1}, step=1)
    d.kill()  # SIGKILL: the accepted delta was never saved
    d.start()
    with pytest.raises(autosaved.StateLost) as info:
        c.update({"b": 2}, step=2)
    assert info.value.details == {"acked_seq": 2, "durable_seq": 0}
    # the refused delta was not merged onto the empty state; after a full resend all is well
    c.update({"a": 1, "b": 2}, step=2)
    assert c.restore() == {"a": 1, "b": 2}
    c.close()


def test_a_save_or_status_first_after_a_restart_does_not_hide_the_loss(make_daemon: Callable[..., PrivateDaemon]
                                                                       ) -> None:
    """Found by the soak (issue 19): when a save, status or restore was the first request to reach the
    restarted daemon, its reply taught the client the new boot id (and the save marked every ack durable),
    so the next update was merged onto a state that had silently lost the accepted delta."""
    d = make_daemon(NO_AUTO_POLICY)
    for first in ("save", "status", "restore"):
        c = autosaved.Client(f"first-{first}", address=d.address, timeout=60)
        c.update({"a": 1}, wait="logged")
        c.update({"b": 1})  # accepted only
        d.kill()
        d.start()
        getattr(c, first)()
        with pytest.raises(autosaved.StateLost):
            c.update({"c": 1})
        c.update({"a": 1, "b": 1, "c": 1})
        assert c.restore() == {"a": 1, "b": 1, "c": 1}
        c.close()


def test_restart_after_commit_is_not_a_loss_and_callback_resends(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    full_state = {"a": 1}
    calls: list[autosaved.StateLost] = []
    c = autosaved.Client("cb", address=d.address, timeout=60, on_state_lost=lambda e: (calls.append(e),
                                                                                      c.update(full_state)))
    c.connect()
    c.update({"a": 1}, wait="committed")
    d.kill()
    d.start()
    c.update({"b": 2})  # everything acked was committed: no loss, no callback
    assert calls == []
    full_state = {"a": 1, "b": 2, "c": 3}
    d.kill()
    d.start()
    c.update({"d": 4})  # "b" was only accepted: the callback resends, then the update goes through
    assert len(calls) == 1
    assert c.restore() == {"a": 1, "b": 2, "c": 3, "d": 4}
    c.close()


def test_second_daemon_on_same_state_dir_refuses(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    d = make_daemon()
    proc = subprocess.run([sys.executable, "-m", "autosaved", "serve", "--state-dir", str(d.state_dir),
                           "--address", f"ipc://{d.sock_dir}/other.sock"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "already using state dir" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "autosaved", "serve", "--state-dir", str(tmp_path / "other"),
                           "--address", d.address], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "already using socket" in proc.stderr
    with autosaved.Client("still-there", address=d.address) as c:
        c.update({"ok": True})


def test_corrupt_newest_version_is_skipped_with_warning(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("cor", address=d.address) as c:
        c.update({"w": np.zeros(1000)}, step=1)
        assert c.save() == 1
        c.update({"w": np.ones(1000)}, step=2)
        assert c.save() == 2
    d.stop()
    # flip one byte of a chunk only version 2 references
    chunk = first_chunk(d.state_dir, "cor")
    raw = bytearray(chunk.read_bytes())
    raw[100] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.warns(autosaved.CorruptVersionWarning, match="version 2"):
        state = autosaved.restore("cor", state_dir=d.state_dir)
    assert (state["w"] == 0).all()
    with pytest.raises(autosaved.CorruptVersion):
        autosaved.restore("cor", state_dir=d.state_dir, version=2)
    listing = subprocess.run([sys.executable, "-m", "autosaved", "list", "cor", "--json", "--offline", "--state-dir",
                              str(d.state_dir)], capture_output=True, text=True, check=True)
    rows = json.loads(listing.stdout)
    assert [(r["id"], r["ok"]) for r in rows] == [(1, True), (2, False)]
    # the daemon, started again, builds on version 1, not on the corrupt one
    d.start()
    with autosaved.Client("cor", address=d.address) as c:
        assert (c.restore()["w"] == 0).all()
    assert "skipping corrupt version" in d.log()


def test_client_without_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(autosaved.DaemonUnavailable, match="autosaved serve"):
        autosaved.Client("x", address=f"ipc://{tmp_path}/none.sock").connect()
    proc = subprocess.run([sys.executable, "-m", "autosaved", "status", "--address", f"ipc://{tmp_path}/none.sock"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no autosaved daemon" in proc.stderr


def test_hung_daemon_times_out(daemon: PrivateDaemon) -> None:
    c = autosaved.Client("hang", address=daemon.address, timeout=0.5)
    c.connect()
    daemon.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(autosaved.DaemonUnavailable, match="did not answer"):
            c.update({"a": 1})
    finally:
        daemon.send_signal(signal.SIGCONT)
    c.update({"a": 2})  # a new socket after the timeout; the daemon is back
    assert c.restore() == {"a": 2}
    c.close()


def test_a_timeout_lowered_between_requests_bounds_the_next_one(daemon: PrivateDaemon) -> None:
    """The blocking client keeps the receive timeout it set on its socket while it still fits the request's
    deadline (perf, issue 21): one set for a 60 s timeout must not outlive a lowered one."""
    c = autosaved.Client("lowered", address=daemon.address, timeout=60)
    c.connect()
    c.update({"a": 1})
    c.timeout = 0.5
    daemon.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(autosaved.DaemonUnavailable, match=r"within 0\.5s"):
            c.update({"a": 2})
        assert time.monotonic() - start < 30  # a receive timeout kept from before (60 s, or a hello's 600 s) would not
    finally:
        daemon.send_signal(signal.SIGCONT)
    c.close()


def test_cli_status_list_save(daemon: PrivateDaemon) -> None:
    env = {**os.environ, "AUTOSAVED_ADDRESS": daemon.address, "AUTOSAVED_STATE_DIR": str(daemon.state_dir)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "autosaved", *args], capture_output=True, text=True, env=env,
                              timeout=60)

    with autosaved.Client("cli-job", address=daemon.address, policy={"idle": "off"}) as c:
        c.update({"x": np.arange(10)}, step=3)
    saved = cli("save", "cli-job")
    assert saved.returncode == 0 and "version 1" in saved.stdout
    status = cli("status", "--json")
    assert status.returncode == 0
    jobs = json.loads(status.stdout)["jobs"]
    assert [(j["job"], j["latest_version"], j["dirty"]) for j in jobs] == [("cli-job", 1, False)]
    human = cli("status")
    assert "cli-job" in human.stdout and human.returncode == 0
    jobs_list = json.loads(cli("list", "--json").stdout)
    assert [(j["job"], j["versions"], j["latest"]) for j in jobs_list] == [("cli-job", 1, 1)]
    # bytes on disk: np.arange(10) is 80 bytes, kept inside the version's one page (format 2) with its key and
    # descriptor
    assert 80 < jobs_list[0]["bytes"] <= 256
    versions = json.loads(cli("list", "cli-job", "--json").stdout)
    assert [(v["id"], v["step"], v["reason"], v["ok"]) for v in versions] == [(1, 3, "explicit", True)]
    assert versions[0]["time"].endswith("Z")
    daemon.stop()
    offline = cli("list", "cli-job", "--json")
    assert offline.returncode == 0 and json.loads(offline.stdout)[0]["id"] == 1
    assert "not reachable" in offline.stderr
    assert cli("status").returncode == 1


def test_demo_resumes_exactly() -> None:
    proc = subprocess.run([sys.executable, "-m", "autosaved", "demo", "--steps", "150", "--kill-at", "60"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed at step 60" in proc.stdout and "identical" in proc.stdout


def test_dead_daemon_never_blocks_the_trainer(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    c = autosaved.Client("dead", address=d.address, timeout=0.5)
    c.connect()
    d.kill()  # the socket file stays behind, nobody listens
    for _ in range(3):
        with pytest.raises(autosaved.DaemonUnavailable, match="did not answer"):
            c.update({"a": 1})
    c.close()
    # hello is a long op (it may wait for a job's replay), but with nobody behind the socket its send is
    # bounded by the ordinary timeout, not the save timeout (it hung a test for 600 s once).
    with pytest.raises(autosaved.DaemonUnavailable, match=r"'hello' within 0.5s"):
        autosaved.Client("dead", address=d.address, timeout=0.5, save_timeout=3600).connect()

    async def async_hello() -> None:
        async with autosaved.AsyncClient("dead", address=d.address, timeout=0.5, save_timeout=3600):
            pass

    with pytest.raises(autosaved.DaemonUnavailable, match=r"'hello' within 0.5s"):
        anyio.run(async_hello)


def test_stopped_daemon_leaves_no_socket_behind(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    assert d.stop() == 0
    assert not list(d.sock_dir.iterdir()) or all(p.suffix == ".lock" for p in d.sock_dir.iterdir())
    with pytest.raises(autosaved.DaemonUnavailable, match="socket file does not exist"):
        autosaved.Client("gone", address=d.address).connect()
