"""Group commit for the write-ahead log: concurrent ``logged`` updates share one fdatasync.

While one batch of a job's records is being written and synced, new records queue up; the flush loop
then writes all of them with a single sync. No request is acknowledged ``logged`` before the sync of
its record returned without error. After a failed write or sync the segment is abandoned (retrying an
fsync that failed and calling the data durable is the "fsyncgate" mistake): the job refuses ``logged``
requests and asks for a snapshot, whose commit starts a fresh segment and clears the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.abc

from ..errors import NotFound, StorageError
from ..storage.faults import point
from .jobs import Job, LogWaiter, raise_durable

log = logging.getLogger("autosaved.wal")
T = TypeVar("T")


class SyncThreads:
    """The threads that run log appends (write + fdatasync). Each job has at most one batch in flight (see
    ``_flush``), and different jobs' batches run on different threads, so the fsyncs of their logs overlap
    (8 agents on a host, each its own job and log). Leaner than ``anyio.to_thread``, which costs a
    ``logged`` update its biggest overhead: measured on 2 cores, a hop to a thread and back took ~15 µs
    this way (a SimpleQueue in, ``call_soon_threadsafe`` out) against ~44 µs."""

    def __init__(self, threads: int = 8) -> None:
        self._count = threads
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]]] = (
            queue.SimpleQueue())
        self._started = False

    async def run(self, func: Callable[[], T]) -> T:
        """``func()`` in one of the threads. Like ``anyio.to_thread.run_sync``, a cancellation waits for it
        to return: an append is never left running behind the caller's back."""
        if not self._started:
            self._started = True
            for i in range(self._count):
                threading.Thread(target=self._work, name=f"autosaved-log-{i}", daemon=True).start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((func, loop, future))
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    def _work(self) -> None:
        while True:
            func, loop, future = self._queue.get()
            try:
                result = func()
            except BaseException as exc:
                _resolve(loop, future.set_exception, exc)
            else:
                _resolve(loop, future.set_result, result)


def _resolve(loop: asyncio.AbstractEventLoop, setter: Callable[[Any], None], value: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (the daemon is exiting)
        loop.call_soon_threadsafe(setter, value)


class LogCommitter:
    def __init__(self, spawn: Callable[[Callable[[Job], object], Job], None], poke: Callable[[], None]) -> None:
        self._spawn = spawn
        self._poke = poke
        self._threads = SyncThreads()
        self.syncs = 0
        self.records = 0

    def enqueue(self, job: Job, waiter: LogWaiter) -> LogWaiter:
        """Queue a record; the caller takes it from the job in this same event-loop step (lsn order)."""
        job.log_pending.append(waiter)
        if not job.log_flushing:
            job.log_flushing = True
            self._spawn(self._flush, job)
        return waiter

    async def wait(self, waiter: LogWaiter) -> None:
        """Until the record's batch is synced; its error, if the append failed."""
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error

    async def submit(self, job: Job, waiter: LogWaiter) -> None:
        """Queue a record (taken from the job in the caller's event-loop step) and wait for its sync."""
        await self.wait(self.enqueue(job, waiter))

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
                    if w.notify is not None:
                        try:
                            w.notify()  # the reply goes out from here: no task waits per request
                        except Exception:
                            log.exception("answering a logged update failed job=%s", job.name)
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
                await self._threads.run(lambda: wal.append(records))
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
