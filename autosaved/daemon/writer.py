"""Saving a job: snapshot in the event loop (atomic), write in a worker thread, commit back."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import anyio.to_thread

from ..errors import AutosavedError, StorageError
from ..policy import SaveReason
from .jobs import Job, SaveTicket, commit_failed, commit_succeeded, take_snapshot

log = logging.getLogger("autosaved.writer")


class Writer:
    def __init__(self, *, chunk_size: int, clock: Callable[[], float], on_done: Callable[[], None],
                 concurrency: int = 2) -> None:
        self.chunk_size = chunk_size
        self.clock = clock
        self.on_done = on_done
        self.limiter = anyio.CapacityLimiter(concurrency)
        self.saves = 0
        self.failures = 0
        self.bytes_written = 0
        # Told each committed save's duration in seconds (the metrics histogram).
        self.observe_duration: Callable[[float], None] = lambda _seconds: None
        # Snapshots being written, by version: their blobs may live in client slots that must stay lent.
        self.in_flight: dict[tuple[int, str, int], SaveTicket] = {}

    def begin(self, job: Job, reason: SaveReason, tg: anyio.abc.TaskGroup) -> None:
        """Snapshot ``job`` now (synchronously, so no update can slip in half-way) and save it in ``tg``."""
        ticket = take_snapshot(job, reason, self.clock())
        tg.start_soon(self._save, ticket)

    async def _save(self, ticket: SaveTicket) -> None:
        job = ticket.job
        # The job's io_lock spans write and retention: garbage collection must never run while another
        # save of the job has written chunks that no manifest references yet.
        key = (*job.key, ticket.version)
        self.in_flight[key] = ticket
        try:
            async with job.io_lock:
                await self._write(ticket)
        finally:
            del self.in_flight[key]

    async def _write(self, ticket: SaveTicket) -> None:
        job = ticket.job
        started = time.perf_counter()
        try:
            async with self.limiter:
                result = await anyio.to_thread.run_sync(
                    lambda: job.store.write_version(
                        ticket.root, version=ticket.version, step=ticket.step, reason=str(ticket.reason),
                        meta=ticket.meta, sessions=ticket.sessions, chunk_size=self.chunk_size,
                        wal_lsn=ticket.wal_lsn,
                    )
                )
        except (StorageError, AutosavedError, OSError) as exc:
            self.failures += 1
            commit_failed(ticket, exc, self.clock())
            log.error("save failed job=%s version=%d reason=%s error=%s retry_in=%.1fs", job.name,
                      ticket.version, ticket.reason, exc, (job.retry_at or 0) - self.clock())
            self.on_done()
            return
        except BaseException as exc:
            commit_failed(ticket, StorageError(f"save interrupted: {exc!r}"), self.clock())
            raise
        commit_succeeded(ticket, result.info.time, result.bytes_written)
        self.observe_duration(time.perf_counter() - started)
        self.saves += 1
        self.bytes_written += result.bytes_written
        log.info("saved job=%s owner=%d version=%d step=%s reason=%s bytes=%d written=%d chunks=%d ms=%.1f",
                 job.name, job.owner, ticket.version, ticket.step, ticket.reason, result.info.bytes,
                 result.bytes_written, result.chunks_written, (time.perf_counter() - started) * 1000)
        self.on_done()
        if job.wal is not None:
            wal = job.wal
            try:
                async with job.wal_lock:
                    if job.rotate_log:
                        # No record was appended since a snapshot: the open segment holds only covered
                        # records, so close it now rather than at the next append.
                        wal.rotate()
                        job.rotate_log = False
                    await anyio.to_thread.run_sync(lambda: wal.drop_through(ticket.wal_lsn))
            except OSError as exc:
                log.warning("could not drop covered log segments job=%s error=%s", job.name, exc)
        try:
            keep = job.settings.keep_last
            deleted = await anyio.to_thread.run_sync(
                lambda: job.store.apply_retention(keep, protect={ticket.version})
            )
            if deleted:
                log.info("retention job=%s deleted_versions=%s", job.name, deleted)
        except OSError as exc:
            log.warning("retention failed job=%s error=%s", job.name, exc)
