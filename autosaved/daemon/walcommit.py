"""Group commit for the write-ahead log: concurrent ``logged`` updates share one fdatasync.

While one batch of a job's records is being written and synced, new records queue up; the flush loop
then writes all of them with a single sync. No request is acknowledged ``logged`` before the sync of
its record returned without error. After a failed write or sync the segment is abandoned (retrying an
fsync that failed and calling the data durable is the "fsyncgate" mistake): the job refuses ``logged``
requests and asks for a snapshot, whose commit starts a fresh segment and clears the error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
import anyio.abc
import anyio.to_thread

from ..errors import NotFound, StorageError
from ..storage.faults import point
from .jobs import Job, LogWaiter, raise_durable

log = logging.getLogger("autosaved.wal")


class LogCommitter:
    def __init__(self, spawn: Callable[[Callable[[Job], object], Job], None], poke: Callable[[], None]) -> None:
        self._spawn = spawn
        self._poke = poke
        self.syncs = 0
        self.records = 0

    async def submit(self, job: Job, waiter: LogWaiter) -> None:
        """Queue a record (taken from the job in the caller's event-loop step) and wait for its sync."""
        job.log_pending.append(waiter)
        if not job.log_flushing:
            job.log_flushing = True
            self._spawn(self._flush, job)
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    async def _flush(self, job: Job) -> None:
        try:
            while job.log_pending:
                batch, job.log_pending = job.log_pending, []
                job.log_writing = batch  # their blobs may live in client slots: keep those lent
                try:
                    error = await self._write(job, batch)
                except Exception as exc:  # never leave a waiter hanging, never end the daemon
                    log.exception("log commit failed job=%s", job.name)
                    error = StorageError(f"could not log the update of {job.name!r}: {exc!r}")
                finally:
                    job.log_writing = []
                for w in batch:
                    w.error = error
                    w.done.set()
        finally:
            job.log_flushing = False

    async def _write(self, job: Job, batch: list[LogWaiter]) -> Exception | None:
        wal = job.wal
        assert wal is not None
        records = [w.record for w in batch]
        async with job.wal_lock:
            if job.deleted:
                return NotFound(f"job {job.name!r} was deleted; this update was not applied")
            if job.wal_broken:
                return StorageError(f"write-ahead log of {job.name!r} is unavailable: {job.wal_broken}")
            if job.rotate_log:
                wal.rotate()
                job.rotate_log = False
            try:
                point("task", "logger", "before", job.name)
                await anyio.to_thread.run_sync(lambda: wal.append(records))
            except Exception as exc:  # a bug too: this job's error (a snapshot follows), never the daemon's
                if not isinstance(exc, OSError):
                    log.exception("unexpected error appending to the log of job=%s", job.name)
                job.wal_broken = str(exc)
                job.wal_broken_lsn = records[-1].lsn
                job.explicit_requested = True  # a snapshot makes everything durable and restarts the log
                self._poke()
                log.error("write-ahead log append failed job=%s records=%d error=%s", job.name, len(records), exc)
                return StorageError(
                    f"could not log the update of {job.name!r} ({exc}); it is held in memory and a snapshot "
                    "is being saved", details={"errno": getattr(exc, "errno", None)},
                )
        for record in records:
            raise_durable(job, record.sessions)
        self.syncs += 1
        self.records += len(records)
        return None
