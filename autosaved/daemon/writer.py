"""Saving a job: snapshot in the event loop (atomic), write in a worker thread, commit back.

Every chunk write goes through one shared :class:`~autosaved.throttle.TokenBucket` (the storage ``pace``
hook), so all concurrent background saves together stay within the rate the throttle controller allows.
A save someone waits for (an explicit ``save()``, a ``wait="committed"`` update or import, the deadline
flush) goes through it at the hard cap only, and a background save of a job someone starts waiting for is
promoted to that (:class:`~autosaved.throttle.SavePace`). The writer
also learns how fast the disk takes unthrottled writes; the deadline flush plans with that speed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import anyio
import anyio.to_thread

from ..errors import AutosavedError, StorageError
from ..policy import SaveReason
from ..storage.faults import point
from ..storage.local import SaveResult
from ..throttle import SaveAborted, SavePace, TokenBucket
from . import loopfirst, memtrim
from .jobs import Job, JobKey, SaveTicket, commit_failed, commit_succeeded, take_snapshot

log = logging.getLogger("autosaved.writer")

# Saves smaller than this say more about fsync latency than about the disk's speed.
SPEED_SAMPLE_MIN = 4 * 1024 * 1024
# Saves made because someone waits for them: the adaptive throttle does not hold them back.
URGENT_REASONS = frozenset({SaveReason.EXPLICIT, SaveReason.SHUTDOWN, SaveReason.PREEMPTION})
# A write speed to plan with before anything was measured: a cautious SATA SSD.
DEFAULT_WRITE_SPEED = 200e6


class Writer:
    def __init__(self, *, chunk_size: Callable[[], int], clock: Callable[[], float], on_done: Callable[[], None],
                 concurrency: int = 2, max_write_rate: float | None = None) -> None:
        # Read at each save, from the live config: a reload changes it for the next save, and nobody
        # writes it here.
        self.chunk_size = chunk_size
        self.bucket = TokenBucket()
        self.bucket.cap = math.inf if max_write_rate is None else float(max_write_rate)
        # Bytes/s the disk took for unthrottled writes (moving average); None until measured.
        self.write_speed: float | None = None
        self.clock = clock
        self.on_done = on_done
        # Told which job's save ended (the daemon's scheduler then decides for that job alone).
        self.on_job_done: Callable[[Job], None] | None = None
        self.limiter = anyio.CapacityLimiter(concurrency)
        # Saves someone waits for (explicit, the deadline flush) have slots of their own: behind background
        # saves of another user's big jobs, a well-behaved user's shutdown save missed the deadline (issue 19).
        self.urgent_limiter = anyio.CapacityLimiter(concurrency)
        self.saves = 0
        self.failures = 0
        self.bytes_written = 0
        # Told each committed save's duration in seconds (the metrics histogram).
        self.observe_duration: Callable[[float], None] = lambda _seconds: None
        # Snapshots being written, by version: their blobs may live in client slots that must stay lent.
        self.in_flight: dict[tuple[int, str, int], SaveTicket] = {}
        # Each in-flight save's pacing, by job: a waiter that arrives promotes them (at most a few per job).
        self.paces: dict[JobKey, dict[int, SavePace]] = {}
        self.urgent_saves = 0
        self.promoted_saves = 0
        # Told of every committed version (the replicator queues it), and asked which versions local
        # retention must keep (those not yet replicated).
        self.on_commit: Callable[[Job, int, int], None] = lambda _job, _version, _written: None
        self.protect: Callable[[Job], set[int]] = lambda _job: set()

    def begin(self, job: Job, reason: SaveReason, tg: anyio.abc.TaskGroup) -> None:
        """Snapshot ``job`` now (synchronously, so no update can slip in half-way) and save it in ``tg``."""
        ticket = take_snapshot(job, reason, self.clock())
        job.save_started_at, job.save_written = None, 0  # set when it starts writing (it may queue first)
        # Registered now, not when the task starts: an update answered in between must be told that the
        # slots this snapshot reads are still lent (``held``).
        self.in_flight[(*job.key, ticket.version)] = ticket
        pace = SavePace(self.bucket, urgent=reason in URGENT_REASONS or bool(job.waiters))
        self.paces.setdefault(job.key, {})[ticket.version] = pace
        tg.start_soon(self._save, ticket, pace)

    def _done(self, job: Job) -> None:
        if self.on_job_done is not None:
            self.on_job_done(job)
        self.on_done()

    def promote(self, job: Job) -> None:
        """Someone waits for ``job`` to be committed: its saves in flight stop taking the adaptive rate."""
        for version, pace in self.paces.get(job.key, {}).items():
            if pace.promote():
                log.info("promoted save job=%s version=%d throttled_ms=%.0f: a client waits for it", job.name,
                         version, pace.throttled_s * 1000)

    async def _save(self, ticket: SaveTicket, pace: SavePace) -> None:
        job = ticket.job
        # The job's io_lock spans write and retention: garbage collection must never run while another
        # save of the job has written chunks that no manifest references yet.
        key = (*job.key, ticket.version)
        try:
            async with job.io_lock:
                written = await self._write(ticket, pace)
        finally:
            del self.in_flight[key]
            paces = self.paces[job.key]
            del paces[ticket.version]
            if not paces:
                del self.paces[job.key]
            ticket.hold.release()
        # Last, outside the job's lock (a restore waits for it): the save's and its retention's buffers
        # are all freed by now.
        await memtrim.after_save(job.name, written)

    async def _write(self, ticket: SaveTicket, pace: SavePace) -> int:
        """Write, commit and apply retention; the bytes written (0 if the save failed)."""
        job = ticket.job
        started = time.perf_counter()
        try:
            if job.deleted:
                raise StorageError(f"job {job.name!r} was deleted")
            point("task", "writer", "before", job.name)
            async with self.urgent_limiter if ticket.reason in URGENT_REASONS else self.limiter:
                write_started = time.perf_counter()
                # Read now, from the live config: a reload may change them mid-save.
                compression, chunk_size = job.settings.compression, self.chunk_size()
                job.save_written, job.save_started_at = 0, self.clock()

                def counted(nbytes: int) -> None:
                    pace(nbytes)
                    job.save_written += nbytes  # read by `status` for `autosaved top` (a display figure)

                def write() -> SaveResult:
                    with loopfirst.stepping_aside():  # the event loop's requests first (loopfirst.py)
                        return job.store.write_version(
                            ticket.root, version=ticket.version, step=ticket.step, reason=str(ticket.reason),
                            meta=ticket.meta, sessions=ticket.sessions, chunk_size=chunk_size,
                            wal_lsn=ticket.wal_lsn, compression=compression,
                            pace=counted, changed=ticket.changed,
                        )

                result = await anyio.to_thread.run_sync(write)
                self._learn_speed(result.bytes_written, time.perf_counter() - write_started, pace.throttled_s)
        except Exception as exc:
            # Whatever went wrong (a bug included) is this job's error, retried with backoff; never the
            # daemon's, whose other jobs keep being served.
            if not isinstance(exc, StorageError | AutosavedError | OSError | SaveAborted):
                log.exception("unexpected error saving job=%s", job.name)
            self.failures += 1
            commit_failed(ticket, exc, self.clock())
            log.error("save failed job=%s version=%d reason=%s error=%s retry_in=%.1fs", job.name,
                      ticket.version, ticket.reason, exc, (job.retry_at or 0) - self.clock())
            self._done(job)
            return 0
        except BaseException as exc:
            commit_failed(ticket, StorageError(f"save interrupted: {exc!r}"), self.clock())
            raise
        job.last_save_duration_s = round(time.perf_counter() - started, 3)
        commit_succeeded(ticket, result.info.time, result.bytes_written)
        self.on_commit(job, ticket.version, result.bytes_written)
        self.observe_duration(time.perf_counter() - started)
        self.saves += 1
        self.urgent_saves += pace.urgent
        self.promoted_saves += pace.promoted
        self.bytes_written += result.bytes_written
        after = pace.throttled_since_promotion
        log.info("saved job=%s owner=%d version=%d step=%s reason=%s bytes=%d written=%d chunks=%d ms=%.1f "
                 "pace=%s throttled_ms=%.0f%s", job.name, job.owner, ticket.version, ticket.step, ticket.reason,
                 result.info.bytes, result.bytes_written, result.chunks_written,
                 (time.perf_counter() - started) * 1000, pace.kind, pace.throttled_s * 1000,
                 "" if after is None else f" throttled_after_promotion_ms={after * 1000:.0f}")
        self._done(job)
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
            except Exception as exc:
                log.warning("could not drop covered log segments job=%s error=%s", job.name, exc)
        try:
            keep, every, best = job.settings.keep_last, job.settings.keep_every, job.settings.keep_best
            protect = {ticket.version} | self.protect(job)
            deleted = await anyio.to_thread.run_sync(
                lambda: job.store.apply_retention(keep, protect=protect, keep_every=every, keep_best=best)
            )
            if deleted:
                log.info("retention job=%s deleted_versions=%s", job.name, deleted)
        except Exception as exc:
            log.warning("retention failed job=%s error=%s", job.name, exc)
        return result.bytes_written

    def _learn_speed(self, nbytes: int, elapsed: float, throttled: float) -> None:
        # Time spent waiting for tokens is not the disk's; with two saves sharing the bucket the
        # subtraction is approximate, so only clearly-measured saves count.
        busy = elapsed - throttled
        if nbytes >= SPEED_SAMPLE_MIN and busy > 0.01:
            self.note_speed(nbytes / busy)

    def note_speed(self, bytes_per_s: float) -> None:
        self.write_speed = bytes_per_s if self.write_speed is None else 0.7 * self.write_speed + 0.3 * bytes_per_s

    def flush_speed(self) -> float:
        """The rate to plan a deadline flush with: the measured speed, held to ``max_write_rate``."""
        return min(self.write_speed or DEFAULT_WRITE_SPEED, self.bucket.cap)
