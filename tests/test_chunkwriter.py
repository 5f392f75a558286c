"""The chunk pipeline's bound on chunks written but not yet durable (storage/chunkwriter.py): small chunks
(a format-2 state's pages) are fsynced many at once, so the journal commits them together; big ones at
most ``DEPTH`` at a time, which bounds the dirty page cache a save adds."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from autosaved.storage import chunkwriter, fileops
from autosaved.storage.chunkwriter import DEPTH, MAX_IN_FLIGHT, SMALL_IN_FLIGHT_BYTES, ChunkPipeline

from .conftest import wait_for


def _in_flight_when_the_writer_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
                                      chunks: int) -> int:
    """Write ``chunks`` chunks of ``size`` bytes with every fsync held back; once the writing thread waits
    for the oldest chunk, how many fsyncs are under way. Then let them all finish."""
    active = 0
    lock = threading.Lock()
    release = threading.Event()
    real_fsync = fileops.fsync

    def held_fsync(fd: int) -> None:
        nonlocal active
        with lock:
            active += 1
        release.wait(120)
        real_fsync(fd)

    monkeypatch.setattr(chunkwriter.fileops, "fsync", held_fsync)
    pipeline = ChunkPipeline(None)
    data = b"x" * size
    errors: list[BaseException] = []

    def write_all() -> None:
        try:
            for i in range(chunks):
                pipeline.put(tmp_path / f"c{i}.tmp", tmp_path / f"c{i}", data)
            pipeline.finish()
        except BaseException as exc:
            errors.append(exc)

    writer = threading.Thread(target=write_all)
    writer.start()
    ident = writer.ident
    assert ident is not None

    def writer_waits() -> bool:
        frame = sys._current_frames().get(ident)
        while frame is not None:
            if frame.f_code.co_name == "result" and "concurrent" in frame.f_code.co_filename:
                return True
            frame = frame.f_back
        return False

    try:
        wait_for(writer_waits, timeout=60)
        wait_for(lambda: active == len(pipeline._pending) + 1, timeout=60)  # the popped one is under way too
        seen = active
    finally:
        release.set()
        writer.join(120)
    assert not errors, errors
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"c{i}" for i in range(chunks))
    return seen


def test_small_chunks_are_synced_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _in_flight_when_the_writer_blocks(tmp_path, monkeypatch, 5000, MAX_IN_FLIGHT + 8) == MAX_IN_FLIGHT


def test_big_chunks_are_synced_at_most_depth_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = SMALL_IN_FLIGHT_BYTES // DEPTH
    assert _in_flight_when_the_writer_blocks(tmp_path, monkeypatch, size, DEPTH + 3) == DEPTH
