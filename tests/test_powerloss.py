"""Power loss, not only SIGKILL: every crash state a POSIX file system may leave (see
:mod:`autosaved.testing.crashsim`) of a recorded run of the real daemon, checked offline and, on a
sample, with a fresh daemon. The larger run is ``scripts/powerloss.py``."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autosaved.storage.chunkwriter as chunk_mod
import autosaved.storage.wal as wal_mod
from autosaved.codec import pack
from autosaved.storage.local import JobStore
from autosaved.storage.wal import Record, WalWriter
from autosaved.testing.crashsim import History, explore, parse, scratch_dir
from autosaved.testing.fstrace import mark, recording
from autosaved.testing.workload import record


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    work = scratch_dir(tmp_path / "work")
    yield work
    shutil.rmtree(work, ignore_errors=True)


def test_every_crash_state_of_a_daemon_run_keeps_every_ack(tmp_path: Path, scratch: Path,
                                                           figure: Callable[[str], None]) -> None:
    """Saves (raw and compressed chunks), logged appends, a failed save, a SIGKILL mid-save and restart,
    retention, gc, delete and recreate: thousands of crash states, none loses an ack or shows half a
    version; a fresh daemon opens a sample of them and serves the same."""
    started = time.monotonic()
    rec = record(tmp_path / "run", rounds=1)
    assert rec.daemon_exits == 0
    trace = parse(rec.trace)
    acks = [m for _, m in trace.marks if m["ev"] == "ack"]
    assert len(acks) >= 15 and len(trace.ops) >= 200  # the workload really ran
    # Sized for < 60 s on a busy 2-core host: every cut, fewer random drop-sets, at most 1,200 distinct
    # states (spread over all cuts); scripts/powerloss.py checks all of them.
    report = explore(trace, rec.history, rec.jobs, scratch, samples=4, window=12, max_states=1200,
                     daemon_states=2, daemon_config=rec.config)
    figure(f"{report.summary()} ({time.monotonic() - started:.0f} s)")
    assert report.findings == [], "\n".join(str(f) for f in report.findings[:20])
    assert report.checked >= 1000
    assert report.daemon_checked == 2


def _old_dedup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put back the behaviour before the defect-6 fix: a save fsyncs only the object directories it
    renamed a chunk into, so a chunk an earlier failed save renamed in stays un-synced when reused.
    (Chunk renames and the chunk directories' fsyncs live in the chunk pipeline, chunkwriter.py.)"""
    renamed: set[Path] = set()
    real_rename, real_fsync_dir = chunk_mod.rename, chunk_mod.fsync_dir
    real_write = JobStore.write_version

    def write_version(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        renamed.clear()
        return real_write(self, *args, **kwargs)

    def rename(src: Path, dst: Path, kind: str) -> None:
        real_rename(src, dst, kind)
        renamed.add(dst.parent)

    def fsync_dir(path: Path, kind: str = "dir") -> None:
        if kind == "chunk" and path.parent.name == "objects" and path not in renamed:
            return
        real_fsync_dir(path, kind)

    monkeypatch.setattr(JobStore, "write_version", write_version)
    monkeypatch.setattr(chunk_mod, "rename", rename)
    monkeypatch.setattr(chunk_mod, "fsync_dir", fsync_dir)


def _failed_save_then_dedup(root: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """In-process: version 1; a save whose directory fsync fails after its chunks are renamed in; a
    save that reuses those chunks, acked committed. Returns the checker's report."""
    state = root / "state"
    state.mkdir(parents=True)
    trace = root / "trace"
    history = History()
    store = JobStore(state, os.geteuid(), "j")
    rng = np.random.default_rng(3)
    real_fsync_dir = chunk_mod.fsync_dir

    def save(version: int, fail: bool = False) -> None:
        n = history.n.get("j", 0)
        mark(str(trace), ev="sent", what="save", job="j", n=n)
        if fail:
            def failing(path: Path, kind: str = "dir") -> None:
                raise OSError(5, "injected EIO")
            monkeypatch.setattr(chunk_mod, "fsync_dir", failing)
        try:
            store.write_version(pack(history.current["j"]), version=version, step=None, reason="test", meta={},
                                sessions={}, chunk_size=64 * 1024, compression="off")
        except Exception:
            assert fail
            return
        finally:
            if fail:
                monkeypatch.setattr(chunk_mod, "fsync_dir", real_fsync_dir)
        mark(str(trace), ev="ack", what="save", job="j", n=n, level="committed")

    def update(delta: dict[str, Any]) -> None:
        n = history.apply("j", delta)
        mark(str(trace), ev="sent", what="update", job="j", n=n)

    with recording(trace, state):
        update({"n": 1, "a": rng.integers(0, 255, 100_000, dtype=np.uint8)})
        save(1)
        update({"n": 2, "b": rng.integers(0, 255, 200_000, dtype=np.uint8)})
        save(2, fail=True)
        real_fsync_dir = chunk_mod.fsync_dir  # the old-behaviour wrapper, when one is in place
        update({"n": 3})
        save(3)
    return explore(parse(trace), history, ["j"], scratch)


def test_checker_finds_the_unsynced_dedup_hole_in_the_old_code(tmp_path: Path, scratch: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              figure: Callable[[str], None]) -> None:
    """The checker is not vacuous: with the pre-fix dedup behaviour it finds committed versions whose
    chunks vanish at a power cut (defect 6); with the fix, the same run has no vulnerability."""
    _old_dedup(monkeypatch)
    before = _failed_save_then_dedup(tmp_path / "old", scratch / "old", monkeypatch)
    monkeypatch.undo()
    after = _failed_save_then_dedup(tmp_path / "new", scratch / "new", monkeypatch)
    figure(f"old: {before.summary()}; new: {after.summary()}")
    assert {f.kind for f in before.findings} >= {"half-visible", "lost-ack"}
    assert after.findings == []
    assert after.checked >= 50


def _group_commits(root: Path, scratch: Path, model: str) -> Any:
    """In-process: logged records appended as the daemon's group committer does (one write per record, one
    fdatasync per batch), a batch of two among them; each acked after its batch's sync."""
    state = root / "state"
    state.mkdir(parents=True)
    trace = root / "trace"
    history = History()
    store = JobStore(state, os.geteuid(), "j")
    with recording(trace, state):
        w = WalWriter(store.log_dir)
        for deltas in ([{"n": 1, "a": np.zeros(1500, np.uint8)}], [{"n": 2, "b": np.ones(1200, np.uint8)},
                                                                  {"n": 3, "c": {"d": 3}}],
                       [{"n": 4, "c": {"e": 4}}]):
            records = []
            for delta in deltas:
                n = history.apply("j", delta)
                mark(str(trace), ev="sent", what="update", job="j", n=n)
                records.append(Record(lsn=n, sessions={"s": n}, step=None, meta={}, delta=pack(delta)))
            w.append(records)
            for r in records:
                mark(str(trace), ev="ack", what="update", job="j", n=r.lsn, level="logged")
        w.close()
    return explore(parse(trace), history, ["j"], scratch / model, model=model)


def test_checker_finds_a_reordered_group_commit_only_with_independent_fates(
        tmp_path: Path, scratch: Path, monkeypatch: pytest.MonkeyPatch, figure: Callable[[str], None]) -> None:
    """The widened model is not vacuous where the old one was blind: with the log's pre-issue-19 replay rule
    put back (any whole record after a bad one is damage), a power cut that keeps the second record of an
    unsynced batch and loses the first makes the job unreadable (acked record 1 lost behind a refusal).
    The old shared-fate model never builds that state; the independent one does; with the fix, neither
    finds anything."""
    real = wal_mod._whole_records_after

    def old_rule(data: memoryview, start: int) -> Iterator[tuple[int, int | None]]:
        for at, _synced in real(data, start):
            yield at, None  # as if every whole record after it confirmed it synced

    monkeypatch.setattr(wal_mod, "_whole_records_after", old_rule)
    old_model = _group_commits(tmp_path / "a", scratch, "shared")
    new_model = _group_commits(tmp_path / "b", scratch, "independent")
    monkeypatch.undo()
    fixed = _group_commits(tmp_path / "c", scratch, "independent")
    figure(f"mutation (old log rule): shared {old_model.summary()}; independent {new_model.summary()}; "
           f"fixed: {fixed.summary()}")
    assert old_model.findings == []
    assert {f.kind for f in new_model.findings} == {"restore-error"}
    assert fixed.findings == [] and fixed.checked > old_model.checked
