"""Crashes at every step of a save and a log append, random SIGKILLs, disk full and I/O errors.

Kill points are injected through ``AUTOSAVED_FAULTS_FILE`` (autosaved/storage/faults.py): the daemon
SIGKILLs itself at exactly that syscall boundary. Disk full is a real tmpfs that really fills up.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autosaved
from autosaved.bench.private import PrivateDaemon
from autosaved.storage.local import Store

from .conftest import NO_AUTO_POLICY, wait_for

KILL_POINTS = [
    "chunk.open.before", "chunk.write.after", "chunk.fsync.before", "chunk.fsync.after", "chunk.rename.before",
    "chunk.rename.after", "chunk.fsync_dir.after", "manifest.write.after", "manifest.fsync.after",
    "manifest.rename.before", "manifest.rename.after", "manifest.fsync_dir.after",
    "wal.open.before", "wal.write.before", "wal.fsync.before", "wal.fsync.after",
]


def assert_store_healthy(state_dir: Path) -> None:
    for js in Store(state_dir).jobs():
        bad = [v for v in js.list_versions() if not v.ok]
        assert not bad, bad


def as_plain(state: Any) -> Any:
    if isinstance(state, dict):
        return {k: as_plain(v) for k, v in state.items()}
    if isinstance(state, np.ndarray):
        return ("array", state.dtype.str, state.tobytes())
    return state


@pytest.mark.parametrize("point", KILL_POINTS)
def test_crash_at_every_step_leaves_a_loadable_store(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path,
                                                     point: str) -> None:
    faults = tmp_path / "faults"
    d = make_daemon('chunk_size = "64KiB"\n' + NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    rng = np.random.default_rng(0)
    acked: dict[str, Any] = {"w": rng.random(50_000), "step": 1}
    with autosaved.Client("job", address=d.address, timeout=2, save_timeout=2) as c:
        c.update(acked, wait="logged")
        c.update({"step": 2}, wait="committed")  # a version, and the log's next record opens a new segment
        acked["step"] = 2
        faults.write_text(f"{point} 1 crash\n")
        new = {"w": rng.random(50_000), "step": 3}
        try:
            # a logged update (hits the wal.* points), then a save (the chunk.* and manifest.* points)
            c.update(new, wait="logged")
            acked.update(new)
            c.save()
        except autosaved.DaemonUnavailable:
            pass
    assert d.proc is not None and d.proc.wait(10) == -9, f"the daemon did not crash at {point}"
    faults.write_text("")
    assert_store_healthy(d.state_dir)
    # everything acknowledged as logged or committed survived; the unacknowledged update may or may not have
    offline = autosaved.restore("job", state_dir=d.state_dir)
    candidates = [as_plain(acked), as_plain({**acked, **new})]
    assert as_plain(offline) in candidates
    d.start()
    with autosaved.Client("job", address=d.address) as c:
        assert as_plain(c.restore()) == as_plain(offline)
        c.save()
    assert_store_healthy(d.state_dir)


KILLS = 50


def apply(model: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    for k, v in delta.items():
        if v is autosaved.DELETE:
            model.pop(k, None)
        else:
            model[k] = v
    return model


def test_random_sigkills_never_lose_a_logged_ack(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """≥ 50 SIGKILLs at random instants while a client streams logged deltas and the daemon saves (and
    collects garbage) every 50 ms; after each restart every acked step is there and every version verifies."""
    d = make_daemon('chunk_size = "64KiB"\n[policy]\nidle = "50ms"\nmin_gap = "0s"\ninterval = "off"\n'
                    'keep_last = 2\n', start=False)
    rng = random.Random(11)
    model: dict[str, Any] = {}
    in_flight: dict[str, Any] = {}
    kills = 0
    step = 0
    while kills < KILLS:
        d.start()
        restored = autosaved.restore("crashy", state_dir=d.state_dir) or {}
        # every acked update is there; the one in flight at the kill may or may not be
        with_in_flight = apply(dict(model), in_flight)
        assert as_plain(restored) in (as_plain(model), as_plain(with_in_flight)), f"after kill {kills}: lost acks"
        model = restored
        in_flight = {}
        timer = threading.Timer(rng.uniform(0.02, 0.4), d.kill)
        timer.start()
        try:
            with autosaved.Client("crashy", address=d.address, timeout=1.0) as c:
                while True:
                    step += 1
                    delta: dict[str, Any] = {"last": step, f"s{step}": np.full(20_000, step, dtype=np.int32)}
                    if step > 3:
                        delta[f"s{step - 3}"] = autosaved.DELETE
                    in_flight = delta
                    c.update(delta, step=step, wait="logged")
                    apply(model, delta)
                    in_flight = {}
        except (autosaved.DaemonUnavailable, autosaved.StateLost):
            pass
        timer.join()
        d.kill()
        kills += 1
        assert_store_healthy(d.state_dir)
    d.start()
    with autosaved.Client("crashy", address=d.address) as c:
        assert as_plain(c.restore()) in (as_plain(model), as_plain(apply(dict(model), in_flight)))


def test_injected_eio_on_a_chunk_is_retried(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("eio", address=d.address) as c:
        c.update({"a": np.arange(100)}, wait="committed")
        faults.write_text("chunk.fsync.before 1 eio\n")
        with pytest.raises(autosaved.StorageError, match="Input/output error"):
            c.update({"a": np.arange(200)}, wait="committed")  # never a false ack
        assert "Input/output error" in c.status()["last_error"]
        # the daemon retries on its own (backoff 1 s) and the fault was a one-off
        wait_for(lambda: c.status()["latest_version"] > 1 and not c.status()["dirty"])
        assert c.status()["last_error"] is None
    assert (autosaved.restore("eio", state_dir=d.state_dir)["a"] == np.arange(200)).all()
    assert_store_healthy(d.state_dir)


def test_failed_log_fsync_is_never_retried_on_the_same_file(make_daemon: Callable[..., PrivateDaemon],
                                                            tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("fsyncgate", address=d.address) as c:
        c.update({"a": 1}, wait="logged")
        faults.write_text("wal.fsync.before 1 eio\n")
        with pytest.raises(autosaved.StorageError, match="could not log"):
            c.update({"a": 2}, wait="logged")
        # the daemon saves a snapshot instead of trusting the log; then logging resumes on a new segment
        wait_for(lambda: c.status()["latest_version"] == 1 and c.status()["wal_error"] is None)
        c.update({"a": 3}, wait="logged")
    d.kill()
    assert autosaved.restore("fsyncgate", state_dir=d.state_dir) == {"a": 3}


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Any:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs that can really fill up")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_state_in_memory_and_recovers(tiny_fs: Path, tmp_path: Path) -> None:
    d = PrivateDaemon(tmp_path / "d", config='[policy]\nidle = "off"\ninterval = "off"\nmin_gap = "0s"\n')
    d.state_dir = tiny_fs / "state"
    try:
        d.start()
        with autosaved.Client("full", address=d.address) as c:
            c.update({"small": np.arange(1000)}, wait="committed")
            big = np.random.default_rng(0).random(1_000_000)  # 8 MB on a 2 MB filesystem
            with pytest.raises(autosaved.StorageError, match="No space left"):
                c.update({"big": big}, wait="committed")
            assert "No space left" in c.status()["last_error"]
            assert c.status()["dirty"]  # still held in memory
            assert (c.restore()["big"] == big).all()
            assert (autosaved.restore("full", state_dir=d.state_dir)["small"] == np.arange(1000)).all()
            assert not list((d.state_dir / "jobs").rglob("*.tmp"))  # no partial files left behind
            # space returns: the daemon's own retry commits it
            subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_fs)], check=True)
            wait_for(lambda: not c.status()["dirty"], timeout=90)
        state = autosaved.restore("full", state_dir=d.state_dir)
        assert (state["big"] == big).all() and (state["small"] == np.arange(1000)).all()
        assert_store_healthy(d.state_dir)
        assert d.stop() == 0
    finally:
        d.cleanup()
        time.sleep(0.1)
