"""Chunk files written as a pipeline: the fsync of one chunk overlaps the write of the next.

A save used to write a chunk, fsync it, rename it, and only then start the next one, so the disk idled
while the CPU copied the next chunk into the page cache, and the CPU idled while the disk flushed
(issue 14: ``persist_s`` up to 1.6x a plain write + fsync). Here the caller's thread writes chunk *n+1*
while one syncer thread makes chunk *n* durable and renames it into place. The crash-safety argument is
unchanged: a chunk gets its final name only after its fsync returned, and the caller commits no
manifest before :meth:`ChunkPipeline.finish` has seen every chunk renamed and fsynced the directories.
At most ``depth`` chunks (or up to :data:`MAX_IN_FLIGHT` small ones, see there) are written but not yet
durable, which bounds the dirty page cache a save adds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from . import fileops
from .faults import point
from .fsutil import SYNC_EVERY, WRITE_PIECE, Pacer, fsync_dir, rename

# Chunks a save has written but not yet made durable: at most DEPTH of any size, or more small ones (a
# format-2 state's pages, 4-16 KiB each) while they stay under SMALL_IN_FLIGHT_BYTES. A small file's fsync
# is mostly a wait for the journal's commit, and fsyncs issued together share commits. Measured here (600
# files of 5 KB, each written, fsynced and renamed): 1.07 ms a file one at a time, 0.65 two at a time, 0.36
# eight and 0.23 thirty-two at a time. A save of 3,778 pages took 9 s two at a time on a busy host and
# made the shutdown flush of a hostile user's jobs miss its deadline (issue 19).
DEPTH = 2
MAX_IN_FLIGHT = 32
SMALL_IN_FLIGHT_BYTES = 4 * 1024 * 1024
# One pool of syncers for the whole process: enough for one save's small files at once; big chunks stay
# at DEPTH per save, so saves of different jobs queue their big fsyncs instead of multiplying them.
_SYNCER = ThreadPoolExecutor(max_workers=MAX_IN_FLIGHT, thread_name_prefix="autosaved-sync")
# Directory fsyncs at the end of a save, all at once: profiled (py-spy, 512 MiB save) one after another
# they took 20% of the save, one journal commit each for up to 256 ``objects/<ab>`` folders; issued
# together, the filesystem's journal commits them in a few batches.
_DIR_SYNCER = ThreadPoolExecutor(max_workers=16, thread_name_prefix="autosaved-dirsync")


def fsync_dirs(dirs: Iterable[Path]) -> None:
    """fsync every directory in ``dirs`` concurrently; raise the first error after all are done."""
    futures = [_DIR_SYNCER.submit(fsync_dir, d, "chunk") for d in dirs]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


@dataclass(frozen=True)
class Written:
    """A chunk file written but not yet durable or named (see :meth:`ChunkPipeline.write`)."""

    fd: int
    tmp: Path
    size: int
    kind: str


class ChunkPipeline:
    def __init__(self, pace: Pacer | None, depth: int = DEPTH) -> None:
        self.pace = pace
        self.depth = depth
        self._pending: list[Future[None]] = []
        self._sizes: list[int] = []  # of the chunks in _pending, in the same order
        self._in_flight_bytes = 0

    def _full(self) -> bool:
        n = len(self._pending)
        return n >= self.depth and (n >= MAX_IN_FLIGHT or self._in_flight_bytes >= SMALL_IN_FLIGHT_BYTES)

    def put(self, tmp: Path, target: Path, data: memoryview | bytes, kind: str = "chunk") -> int:
        """Write ``data`` to the new file ``tmp`` (O_EXCL) and queue its fsync and its rename to ``target``;
        returns the bytes written. Raises the error of any earlier chunk that failed. ``kind`` names the
        fault points (``chunk``, or ``page`` for the pages of a format-2 state tree)."""
        written = self.write(tmp, data, kind)
        self.settle(written, target)
        return written.size

    def write(self, tmp: Path, data: memoryview | bytes, kind: str = "chunk", *, readable: bool = False) -> Written:
        """The first half of :meth:`put`: write ``data`` to the new file ``tmp`` and keep it open, neither
        durable nor named, until :meth:`settle` or :meth:`discard`. ``readable`` opens it for reading too
        (a caller that names the chunk by hashing what reached the file, :mod:`.slotwrite`)."""
        while self._full():
            self._in_flight_bytes -= self._sizes.pop(0)
            self._pending.pop(0).result()
        point(kind, "open", "before", tmp)
        mode = os.O_RDWR if readable else os.O_WRONLY
        fd = fileops.open_fd(tmp, mode | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            size = self._write(fd, tmp, data, kind)
        except BaseException:
            fileops.close(fd)
            fileops.unlink(tmp, missing_ok=True)
            raise
        return Written(fd, tmp, size, kind)

    def settle(self, written: Written, target: Path) -> None:
        """Queue the fsync of a :meth:`write` and its rename to ``target`` (the syncer thread's work)."""
        self._pending.append(_SYNCER.submit(_settle, written.fd, written.tmp, target, written.kind))
        self._sizes.append(written.size)
        self._in_flight_bytes += written.size

    @staticmethod
    def discard(written: Written) -> None:
        """Drop a :meth:`write` the store turned out to hold already: never synced, never named."""
        fileops.close(written.fd)
        fileops.unlink(written.tmp, missing_ok=True)

    def _write(self, fd: int, tmp: Path, data: memoryview | bytes, kind: str) -> int:
        # As fsutil.write_fsync: with a pacer, 1 MiB slices announced first, and an fdatasync every
        # SYNC_EVERY bytes of a chunk larger than that.
        view = memoryview(data).cast("B")
        written = unsynced = 0
        while view.nbytes:
            if self.pace is not None:
                self.pace(min(view.nbytes, WRITE_PIECE))
            point(kind, "write", "before", tmp)
            # fileops.write: the point chunk.write.middle (a torn chunk file), as in fsutil.write_fsync.
            n = fileops.write(fd, view[:WRITE_PIECE] if self.pace is not None else view, kind, tmp)
            written += n
            unsynced += n
            view = view[n:]
            point(kind, "write", "after", tmp)
            if self.pace is not None and unsynced >= SYNC_EVERY and view.nbytes:
                fileops.fdatasync(fd)
                unsynced = 0
                os.posix_fadvise(fd, 0, written, os.POSIX_FADV_DONTNEED)
        return written

    def finish(self) -> None:
        """Wait until every queued chunk is durable under its final name; raise the first error."""
        error: BaseException | None = None
        for future in self._pending:
            try:
                future.result()
            except BaseException as exc:  # wait for all of them before raising: no fd is left open
                error = error or exc
        self._pending, self._sizes, self._in_flight_bytes = [], [], 0
        if error is not None:
            raise error

    def abandon(self) -> None:
        """After a failure: wait for the queued chunks (their errors are moot) so none outlives the save."""
        for future in self._pending:
            future.exception()
        self._pending, self._sizes, self._in_flight_bytes = [], [], 0


def _settle(fd: int, tmp: Path, target: Path, kind: str) -> None:
    try:
        point(kind, "fsync", "before", tmp)
        fileops.fsync(fd)
        point(kind, "fsync", "after", tmp)
        # Checkpoint bytes must not evict the trainer's own cached data.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        fileops.close(fd)
        fileops.unlink(tmp, missing_ok=True)
        raise
    fileops.close(fd)
    try:
        rename(tmp, target, kind)
    except BaseException:
        fileops.unlink(tmp, missing_ok=True)
        raise
