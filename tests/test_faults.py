"""Crashes at every step of a save and a log append, random SIGKILLs, disk full and I/O errors.

Kill points are injected through ``AUTOSAVED_FAULTS_FILE`` (autosaved/storage/faults.py): the daemon
SIGKILLs itself at exactly that syscall boundary. Disk full is a real tmpfs that really fills up.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autosaved
from autosaved.storage import faults
from autosaved.storage.faults import POINTS
from autosaved.storage.fsutil import write_fsync
from autosaved.storage.local import Store
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, fault_fired, finish, skip_or_fail, spawn_python, wait_for

# Every storage point: the crash scenario below reaches each. The others (the event loop's, the tasks',
# gc's, the replicator's, delete's) are each reached by a test that waits for it with ``fault_fired``.
CRASH_POINTS = sorted(p for p in POINTS
                      if not p.startswith(("loop.", "rpc.", "task.", "gc.", "remote.", "delete.", "load.",
                                           "restore.", "offload.")))
LATER_HIT = 3
W_LEN = 40_000  # 320 KB of float64: five 64 KiB chunks, so every chunk point is hit several times a save

# A trainer process: each round a logged update and an explicit save of "job" (chunks, manifest, log
# rotation and segment deletes, retention and gc), and a logged update of a new job (its directories
# and log). It prints each request before sending it and each ack, so the test knows what was acked.
CRASH_TRAINER = """
    import json, os
    import numpy as np
    import autosaved
    phase = int(os.environ["PHASE"])
    def say(*what): print(json.dumps(what), flush=True)
    with autosaved.Client("job", address=os.environ["ADDRESS"], timeout=300, save_timeout=300) as c:
        for r in range(1, 5):
            step = 100 * phase + r
            say("sent", "job", step)
            c.update({"w": np.random.default_rng(step).random(W_LEN), "step": step}, wait="logged")
            say("logged", "job", step)
            c.save()
            say("saved", "job", step)
            with autosaved.Client(f"x{step}", address=os.environ["ADDRESS"], timeout=300) as x:
                say("sent", f"x{step}", step)
                x.update({"v": step}, wait="logged")
                say("logged", f"x{step}", step)
    say("done")
""".replace("W_LEN", str(W_LEN))


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


def job_state(job: str, step: int) -> dict[str, Any]:
    if job == "job":
        return {"w": np.random.default_rng(step).random(W_LEN), "step": step}
    return {"v": step}


def run_crash_phase(d: PrivateDaemon, phase: int, acked: dict[str, int], maybe: dict[str, int]) -> None:
    """Run the trainer until the daemon SIGKILLs itself at the armed point; record acks in ``acked`` and
    the one request in flight in ``maybe``."""
    trainer = spawn_python(CRASH_TRAINER, ADDRESS=d.address, PHASE=str(phase))
    assert d.proc is not None
    code = d.proc.wait(300)  # the trainer's requests drive the daemon into the fault; it never gets a timeout
    out, err = finish(trainer)
    assert code == -signal.SIGKILL, f"the daemon did not crash (exit {code}); the point was not reached\n{out}{err}"
    maybe.clear()
    for line in out.splitlines():
        what, *rest = json.loads(line)
        assert what != "done", "the trainer finished: the daemon crashed only after every request"
        job, step = rest
        if what == "sent":
            maybe[job] = step
        elif what == "logged":
            acked[job] = step
            maybe.pop(job, None)


def check_survivors(d: PrivateDaemon, acked: dict[str, int], maybe: dict[str, int]) -> None:
    """Every logged ack is there (offline); the request in flight is there whole or not at all."""
    assert_store_healthy(d.state_dir)
    for job in sorted(set(acked) | set(maybe)):
        got = as_plain(autosaved.restore(job, state_dir=d.state_dir))
        allowed = [as_plain(job_state(job, acked[job])) if job in acked else as_plain(None)]
        if job in maybe:
            allowed.append(as_plain(job_state(job, maybe[job])))
        assert got in allowed, f"{job}: lost or half-applied (acked {acked.get(job)}, in flight {maybe.get(job)})"
        if job in maybe and got == allowed[-1]:
            acked[job] = maybe[job]  # it survived: from now on it must stay


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_every_point_first_and_later_hit(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path,
                                                  point: str) -> None:
    """The daemon SIGKILLs itself at ``point`` (on its first hit, then after a restart on its third): no
    logged ack is lost, no version is torn or half-visible, the store opens with the offline restore and
    with a fresh daemon, and the daemon then saves again."""
    faults = tmp_path / "faults"
    d = make_daemon('chunk_size = "64KiB"\n' + NO_AUTO_POLICY + "keep_last = 1\n",
                    env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("job", address=d.address) as c:
        c.update(job_state("job", 0), wait="committed")  # a version, and a log segment after it
    acked, maybe = {"job": 0}, dict[str, int]()
    for phase, nth in ((1, 1), (2, LATER_HIT)):
        faults.write_text(f"{point} {nth} crash\n")
        run_crash_phase(d, phase, acked, maybe)
        faults.write_text("")
        if point == "wal.write.middle":  # a real torn tail: half a record on disk, never acked
            torn = [j.check()["log"]["torn"] for j in Store(d.state_dir).jobs()]
            assert any(torn), torn
        check_survivors(d, acked, maybe)
        d.start()
        with autosaved.Client("job", address=d.address) as c:
            assert as_plain(c.restore()) == as_plain(autosaved.restore("job", state_dir=d.state_dir))
    with autosaved.Client("job", address=d.address) as c:
        c.update({"after": True}, wait="committed")
    assert d.stop() == 0
    assert_store_healthy(d.state_dir)
    assert autosaved.restore("job", state_dir=d.state_dir)["after"] is True


def test_every_fault_point_is_fired_by_a_test(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    """The crash scenario reaches every storage point in POINTS and no point missing from it; every other
    point is waited for with ``fault_fired`` by a test, which fails unless the daemon recorded reaching it.
    A new call site of ``faults.point`` that no test fires fails here."""
    faults = tmp_path / "faults"
    faults.write_text("")
    d = make_daemon('chunk_size = "64KiB"\n' + NO_AUTO_POLICY + "keep_last = 1\n",
                    env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("job", address=d.address) as c:
        c.update(job_state("job", 0), wait="committed")
    trainer = spawn_python(CRASH_TRAINER, ADDRESS=d.address, PHASE="1")
    out, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 0 and '"done"' in out, err
    seen = set((tmp_path / "faults.seen").read_text().split())
    assert seen - set(POINTS) == set(), "points reached that POINTS does not list"
    assert seen & set(CRASH_POINTS) == set(CRASH_POINTS), f"never reached: {set(CRASH_POINTS) - seen}"
    fired = points_fired_by_tests()
    others = {p: [t for pattern, t in fired if re.fullmatch(pattern, p)] for p in POINTS if p not in CRASH_POINTS}
    assert [p for p, tests in others.items() if not tests] == [], "points no test waits for with fault_fired"


def points_fired_by_tests() -> list[tuple[str, str]]:
    """(regex of a point, test) for every ``fault_fired(faults, point)`` in a test function: the test
    fails unless the daemon recorded reaching that point. An f-string point (``f"task.{task}.start"``)
    stands for each value the test is parametrized with (any text, when that is not a literal list)."""
    out = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef) or not fn.name.startswith("test_"):
                continue
            params = _parametrized(fn)
            for call in ast.walk(fn):
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "fault_fired"
                        and len(call.args) >= 2):
                    for pattern in _patterns(call.args[1], params):
                        out.append((pattern, f"{path.name}::{fn.name}"))
    return out


def _parametrized(fn: ast.FunctionDef) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for deco in fn.decorator_list:
        if (isinstance(deco, ast.Call) and ast.unparse(deco.func).endswith("parametrize") and len(deco.args) == 2
                and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[1], ast.List)
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in deco.args[1].elts)):
            values[deco.args[0].value] = [e.value for e in deco.args[1].elts]  # type: ignore[attr-defined]
    return values


def _patterns(node: ast.expr, params: dict[str, list[str]]) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [re.escape(node.value)]
    if not isinstance(node, ast.JoinedStr):
        return []
    patterns = [""]
    for part in node.values:
        if isinstance(part, ast.Constant):
            patterns = [p + re.escape(str(part.value)) for p in patterns]
        elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) and part.value.id in params:
            patterns = [p + re.escape(v) for p in patterns for v in params[part.value.id]]
        else:
            patterns = [p + ".+" for p in patterns]
    return patterns


# The streamer: logged deltas as fast as the daemon acks them (a new array, and the one three steps
# back deleted). With dirty_bytes at 256 KiB the daemon's own policy saves every few deltas.
STREAMER = """
    import os
    import numpy as np
    import autosaved
    step = int(os.environ["STEP0"])
    with autosaved.Client("crashy", address=os.environ["ADDRESS"], timeout=300) as c:
        while True:
            print("sent", step, flush=True)
            c.update(DELTA, step=step, wait="logged")
            print("logged", step, flush=True)
            step += 1
"""
DELTA = '{"last": step, f"s{step}": np.full(20_000, step, dtype=np.int32), f"s{step - 3}": autosaved.DELETE}'
# The second client: explicit saves and online gc of the same job, back to back, and the daemon's
# counters after each (saves, log records), so the test sees what happened before each kill.
CONTROLLER = """
    import json, os, time
    import autosaved
    with (autosaved.Client("crashy", address=os.environ["ADDRESS"], timeout=300, save_timeout=300) as c,
          autosaved.Admin(address=os.environ["ADDRESS"], timeout=300, save_timeout=300) as admin):
        while True:
            print("save-sent", flush=True)
            try:
                c.save()
            except autosaved.NotFound:  # a job exists from its first update: the streamer's has not come yet
                print("save-early", flush=True)
                time.sleep(0.05)
                continue
            print("save-done", flush=True)
            print("gc-sent", flush=True)
            (gc,) = admin.gc("crashy")
            print("gc-done", json.dumps(gc), flush=True)
            d = admin.status()["daemon"]
            print("counters", json.dumps({"saves": d["saves"], "wal_records": d["wal_records"]}), flush=True)
"""


def delta_of(step: int) -> dict[str, Any]:
    return {"last": step, f"s{step}": np.full(20_000, step, dtype=np.int32), f"s{step - 3}": autosaved.DELETE}


def apply(model: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    for k, v in delta.items():
        if v is autosaved.DELETE:
            model.pop(k, None)
        else:
            model[k] = v
    return model


class Lines:
    """A child's stdout, read line by line as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.lines = proc, list[str]()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def finish(self) -> tuple[list[str], str]:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(60)
        self.thread.join(60)
        assert self.proc.stderr is not None
        return self.lines, self.proc.stderr.read()


MIN_ACKS = 5  # logged acks every cycle must reach before the kill is armed


def random_kills(make_daemon: Callable[..., PrivateDaemon], kills: int, seed: int,
                 figure: Callable[[str], None]) -> dict[str, int]:
    d = make_daemon('chunk_size = "64KiB"\n[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "256KiB"\n'
                    'min_gap = "0s"\nkeep_last = 2\n', start=False)
    rng = random.Random(seed)
    model: dict[str, Any] = {}
    counts = {"kills": 0, "acks": 0, "min_acks_per_cycle": 1 << 30, "daemon_saves": 0, "explicit_saves": 0,
              "gc_runs": 0, "gc_removed_chunks": 0, "gc_deleted_versions": 0, "kills_during_save": 0,
              "kills_during_gc": 0, "in_flight_survived": 0}
    step = 1
    for cycle in range(kills):
        d.start()
        # every acked delta is there; the one in flight at the kill may or may not be
        restored = as_plain(autosaved.restore("crashy", state_dir=d.state_dir) or {})
        assert restored == as_plain(model), f"cycle {cycle}: the restored state is not what was acked"
        assert_store_healthy(d.state_dir)
        streamer = Lines(spawn_python(STREAMER.replace("DELTA", DELTA), ADDRESS=d.address, STEP0=str(step)))
        controller = Lines(spawn_python(CONTROLLER, ADDRESS=d.address))
        # Armed once this cycle has MIN_ACKS acks, and the daemon's own counters (read by the controller
        # after a save and a gc) show a committed save: every cycle then interleaves saves and gc with the
        # stream, whatever the host's speed.
        wait_for(lambda s=streamer: sum(ln.startswith("logged") for ln in s.lines) >= MIN_ACKS, timeout=120)
        wait_for(lambda c=controller: any(ln.startswith("counters") and json.loads(ln.split(" ", 1)[1])["saves"] >= 1
                                          for ln in list(c.lines)), timeout=120)
        time.sleep(rng.uniform(0.0, 0.4))  # a random instant
        d.kill()  # SIGKILL, and reaped
        counts["kills"] += 1
        out, err = streamer.finish()
        ctl, ctl_err = controller.finish()
        for e in (err, ctl_err):  # both were SIGKILLed while waiting: no exception, and never StateLost
            assert "Traceback" not in e, e
        acks = [int(ln.split()[1]) for ln in out if ln.startswith("logged")]
        sent = [int(ln.split()[1]) for ln in out if ln.startswith("sent")]
        assert acks == list(range(step, step + len(acks))), "acks out of order"
        counts["acks"] += len(acks)
        counts["min_acks_per_cycle"] = min(counts["min_acks_per_cycle"], len(acks))
        for s in acks:
            apply(model, delta_of(s))
        in_flight = sent[-1] if sent and sent[-1] not in acks else None
        step = (in_flight or acks[-1]) + 1
        # The controller's view: was a save or a gc outstanding when the daemon died?
        last = ctl[-1] if ctl else ""
        counts["kills_during_save"] += last == "save-sent"
        counts["kills_during_gc"] += last == "gc-sent"
        counts["explicit_saves"] += sum(ln == "save-done" for ln in ctl)
        for ln in ctl:
            if ln.startswith("gc-done"):
                gc = json.loads(ln.split(" ", 1)[1])
                counts["gc_runs"] += 1
                counts["gc_removed_chunks"] += gc["removed_chunks"]
                counts["gc_deleted_versions"] += len(gc["deleted_versions"])
        counters = [json.loads(ln.split(" ", 1)[1]) for ln in ctl if ln.startswith("counters")]
        counts["daemon_saves"] += counters[-1]["saves"] if counters else 0
        if in_flight is not None:
            with_it = as_plain(apply(dict(model), delta_of(in_flight)))
            now = as_plain(autosaved.restore("crashy", state_dir=d.state_dir) or {})
            assert now in (as_plain(model), with_it), f"cycle {cycle}: lost acks or a half-applied delta"
            if now == with_it:
                apply(model, delta_of(in_flight))
                counts["in_flight_survived"] += 1
    d.start()
    with autosaved.Client("crashy", address=d.address) as c:
        assert as_plain(c.restore()) == as_plain(model)
    assert d.stop() == 0
    assert_store_healthy(d.state_dir)
    # The kills really landed among saves and gc, every cycle acked enough, and the daemon's own
    # counters show saves between the kills.
    assert counts["min_acks_per_cycle"] >= MIN_ACKS
    versions = Store(d.state_dir).job(os.geteuid(), "crashy").version_ids()
    counts["retention_deleted_versions"] = versions[-1] - len(versions)  # ids are never reused
    figure(f"random SIGKILLs (seed {seed}): {json.dumps(counts)}")
    assert counts["daemon_saves"] >= kills and counts["gc_runs"] >= kills, counts
    assert counts["retention_deleted_versions"] >= 1, counts
    assert counts["kills_during_save"] + counts["kills_during_gc"] >= 1, counts
    return counts


def test_random_sigkills_never_lose_a_logged_ack(make_daemon: Callable[..., PrivateDaemon],
                                                 figure: Callable[[str], None]) -> None:
    """SIGKILLs at random instants while one client streams logged deltas (the daemon's dirty_bytes policy
    saves every few) and another runs explicit saves and online gc back to back; after each kill every
    logged ack is there, the delta in flight is whole or absent, and every version verifies."""
    random_kills(make_daemon, kills=6, seed=11, figure=figure)


@pytest.mark.slow
def test_random_sigkills_long(make_daemon: Callable[..., PrivateDaemon], figure: Callable[[str], None]) -> None:
    random_kills(make_daemon, kills=60, seed=12, figure=figure)


def test_injected_eio_on_a_chunk_is_retried(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("eio", address=d.address) as c:
        # leaves over statepages.INLINE_MAX: stored as chunks, not inside the format-2 pages
        c.update({"a": np.arange(1000)}, wait="committed")
        faults.write_text("chunk.fsync.before 1 eio\n")
        with pytest.raises(autosaved.StorageError, match="Input/output error"):
            c.update({"a": np.arange(2000)}, wait="committed")  # never a false ack
        assert "Input/output error" in c.status()["last_error"]
        # the daemon retries on its own (backoff 1 s) and the fault was a one-off
        wait_for(lambda: c.status()["latest_version"] > 1 and not c.status()["dirty"])
        assert c.status()["last_error"] is None
    assert (autosaved.restore("eio", state_dir=d.state_dir)["a"] == np.arange(2000)).all()
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
        skip_or_fail("needs root to mount a tmpfs that can really fill up")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
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


@pytest.fixture
def overcommitted_fs(tmp_path: Path) -> Any:
    """An ext2 file system on a loop device whose 64 MiB backing file is sparse, on an 8 MiB tmpfs: writes
    land in the page cache, and the fsync that pushes them to the loop device fails for real (the kernel
    cannot store the blocks), as a failing or thin-provisioned disk does. Growing the tmpfs heals it."""
    for tool in ("mount", "losetup", "mkfs.ext2"):
        if os.geteuid() != 0 or not shutil.which(tool):
            skip_or_fail(f"needs root and {tool} to build a file system whose fsync really fails")
    back, mnt = tmp_path / "back", tmp_path / "mnt"
    back.mkdir()
    mnt.mkdir()
    steps: list[list[str]] = []

    def run(*cmd: str) -> str:
        proc = subprocess.run(list(cmd), capture_output=True, text=True)
        if proc.returncode != 0:
            skip_or_fail(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout.strip()

    run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(back))
    steps.append(["umount", "-l", str(back)])
    try:
        (back / "disk.img").touch()
        os.truncate(back / "disk.img", 64 * 1024 * 1024)
        dev = run("losetup", "-f", "--show", str(back / "disk.img"))
        steps.append(["losetup", "-d", dev])
        run("mkfs.ext2", "-q", dev)
        run("mount", dev, str(mnt))
        steps.append(["umount", "-l", str(mnt)])
        yield mnt, back
    finally:
        for cmd in reversed(steps):
            subprocess.run(cmd, check=False, capture_output=True)


def test_real_failed_fsync_is_never_acked_and_recovers(overcommitted_fs: tuple[Path, Path], tmp_path: Path,
                                                       figure: Callable[[str], None]) -> None:
    mnt, back = overcommitted_fs
    d = PrivateDaemon(tmp_path / "d", config='write_speed = "200MiB"\n' + NO_AUTO_POLICY)
    d.state_dir = mnt / "state"
    try:
        d.start()
        with autosaved.Client("real", address=d.address, timeout=120, save_timeout=600) as c:
            c.update({"small": np.arange(1000)}, wait="committed")
            big = np.random.default_rng(0).integers(0, 2**62, 3 * 1024 * 1024)  # 24 MiB: more than the disk holds
            with pytest.raises(autosaved.StorageError) as failed:  # never a false ack
                c.update({"big": big}, wait="committed")
            status = c.status()
            assert status["dirty"] and status["last_error"], status  # reported, and still held in memory
            figure(f"the real failure: {failed.value}")
            assert (c.restore()["big"] == big).all()
            assert (autosaved.restore("real", state_dir=d.state_dir)["small"] == np.arange(1000)).all()
            assert "big" not in autosaved.restore("real", state_dir=d.state_dir)
            # the disk heals: the daemon's own retry (with backoff) commits, on new files
            subprocess.run(["mount", "-o", "remount,size=256m", str(back)], check=True)
            wait_for(lambda: not c.status()["dirty"], timeout=180)
        assert d.stop() == 0
        state = autosaved.restore("real", state_dir=d.state_dir)
        assert (state["big"] == big).all() and (state["small"] == np.arange(1000)).all()
        assert_store_healthy(d.state_dir)
        assert "failed" in d.log()
    finally:
        d.cleanup()


def test_a_non_fatal_action_half_way_through_a_write_writes_the_buffer_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``<kind>.write.middle`` with an action that returns (here ``sleep:0``): the write goes on with the
    second half. (It used to write the whole buffer again after the first half: a file with its first half
    twice.)"""
    rules = tmp_path / "faults"
    rules.write_text("chunk.write.middle 1 sleep:0\n")
    monkeypatch.setenv("AUTOSAVED_FAULTS_FILE", str(rules))
    monkeypatch.setattr(faults, "_faults", faults._Faults())
    data = bytes(range(256)) * 41
    assert write_fsync(tmp_path / "f", [data]) == len(data)
    assert (tmp_path / "f").read_bytes() == data
    assert "chunk.write.middle" in (tmp_path / "faults.seen").read_text()


def test_a_restore_of_a_loaded_state_is_not_overtaken_by_retention(make_daemon: Callable[..., PrivateDaemon],
                                                                   tmp_path: Path) -> None:
    """Soak defect (issue 19: ``restore raised CorruptVersion('s1 (live state): chunk … is missing')``): a
    state loaded after a restart keeps its leaves in chunk files, and a restore read them without the
    job's io lock. An update that replaced the leaf, its save and that save's retention (keep_last = 1)
    deleted the chunks while the restore was about to read them. Now the restore holds the lock from taking
    the tree until its leaves are read, and the save waits for it."""
    faults = tmp_path / "faults"
    faults.write_text("")
    d = make_daemon('chunk_size = "64KiB"\n' + NO_AUTO_POLICY + "keep_last = 1\n",
                    env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    old = np.full(100_000, 1, np.uint8)
    with autosaved.Client("job", address=d.address) as c:
        c.update({"arr": old}, wait="committed")
    d.kill()
    d.start()  # the job is loaded again on its first request: its leaf stays in its chunk files
    faults.write_text("restore.read.before 1 sleep:3\n")
    got: list[Any] = []

    def restore() -> None:
        with autosaved.Client("job", address=d.address, timeout=30, save_timeout=60) as r:
            try:
                got.append(r.restore())
            except Exception as exc:
                got.append(exc)

    reader = threading.Thread(target=restore)
    reader.start()
    fault_fired(faults, "restore.read.before")
    with autosaved.Client("job", address=d.address, timeout=30, save_timeout=60) as c:
        c.update({"arr": np.full(100_000, 2, np.uint8)}, wait="committed")  # retention drops the old version
    reader.join(60)
    assert len(got) == 1 and not isinstance(got[0], Exception), got
    assert np.array_equal(got[0]["arr"], old)
    with autosaved.Client("job", address=d.address) as c:
        assert np.array_equal(c.restore()["arr"], np.full(100_000, 2, np.uint8))
