"""Group commit for the write-ahead log: concurrent ``logged`` updates share one fdatasync.

While one batch of a job's records is being written and synced, new records queue up; the flush loop
then writes all of them with a single sync. No request is acknowledged ``logged`` before the sync of
its record returned without error. After a failed write or sync the segment is abandoned (retrying an
fsync that failed and calling the data durable is the "fsyncgate" mistake): the job refuses ``logged``
requests and asks for a snapshot, whose commit starts a fresh segment and clears the error.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import NotFound, StorageError
from ..policy import log_over
from ..storage.faults import point
from ..storage.wal import Record, replay_speed
from .jobs import Job, LogWaiter, raise_durable

log = logging.getLogger("autosaved.wal")
# Called on the event loop once a thread's work returned: its exception, or None.
Done = Callable[[BaseException | None], None]
# What a log thread is handed: the work (which returns whether it answered every request itself), where
# and how to report back, and whether more work waits for that report (see SyncThreads.submit).
_Work = tuple[Callable[[], bool], asyncio.AbstractEventLoop, Done, contextvars.Context, Callable[[], bool] | None]
# How long a log thread that answered its batch itself waits before waking the event loop for the
# batch's bookkeeping (see SyncThreads).
LINGER = 0.002


@dataclass(eq=False)
class _LogThread:
    number: int
    # Work handed to this thread (by :meth:`SyncThreads.submit`, under its lock): also what wakes it.
    inbox: queue.SimpleQueue[_Work] = field(default_factory=queue.SimpleQueue)
    # Idle after work it answered itself, for at most the linger: the same job's next batch comes here.
    lingering: bool = False


class SyncThreads:
    """The threads that run log appends (write + fdatasync). Each job has at most one batch in flight, and
    different jobs' batches run on different threads, so the fsyncs of their logs overlap (8 agents on a
    host, each its own job and log).

    Why per-job segments synced by concurrent threads, not one shared per-disk log with one sync per group
    (issue 21, measured on the 2-core test host, ext4): 8 threads each appending 200 bytes + ``fdatasync``
    to its own file ran 3.7x the rate of one thread, because the kernel's journal folds concurrent syncs
    into one commit; the same 8 files synced in a cycle by one thread (a barrier per group) ran 1x, and
    in parallel with a barrier 2.5x. So the cross-job group commit is the journal's, and the per-job
    segments keep replay, deletion at a snapshot and the damage rules per job.

    What a ``logged`` update cost on that host was mostly thread switches and turns on the GIL, not the
    disk (``perf``: a third of the daemon's cycles in the scheduler; 740 µs of daemon CPU per ``logged``
    update against 170 µs per ``accepted`` one; each update woke the loop twice and its log thread about
    nine times, three of them inside ``fdatasync``). So each batch costs as few wake-ups as it can:

    - the records are framed on the event loop (``WalWriter.frame``): the thread only writes, syncs and
      answers, so it holds the GIL for less of the time the loop may want it;
    - the thread answers the requests itself right after the sync (``_answer_synced``), and the event
      loop's bookkeeping of the batch (durable seqs, the log's lock, the next batch) is left in
      :attr:`_completed` for the loop's next step: every request starts with :meth:`settle`, so a client
      that sends its next update soon pays for one wake-up of the loop, not two. A thread that answered its
      batch waits :data:`LINGER` for such a request and wakes the loop itself if none came; a batch it
      could not answer (an error, a request with client slots) wakes the loop at once.

    Work is handed to a thread, not left on one queue they all wait on (:meth:`submit`): a job's next batch
    to the thread that ran its last one while that thread lingers, else to an idle thread, else to one
    lingering for another job, else it waits for the first thread to finish. With one shared queue, one
    client's batches went round all 8 threads: each batch woke another thread than the one lingering after
    the last, whose linger then ran out and woke the loop for nothing. Measured over 5,000 ``logged``
    updates of one client (``cProfile``): the event loop went round 7,035 times with one queue, 5,084 with
    the job's thread preferred. ``scripts/cost_per_request.py --what small,eight --waits logged``, the two
    builds alternating three times each (load 1.4-3.1): one client's daemon CPU per update 541-561 ->
    456-474 µs, thread switches 11.0 -> 8.2, updates per second 1,172-1,296 -> 1,339-1,380, p50 0.76-0.78
    -> 0.70-0.73 ms; 8 clients' 2,141-2,254 -> 2,101-2,244 per second (unchanged). A thread
    is only preferred while it lingers, and a lingering thread takes any job's work when no thread is
    idle: a batch never waits behind another job's sync, or for a linger to run out, while a thread is free.
    An earlier try (a thread per client, started as work came, or a stack of idle threads) was dropped
    after runs at load 6-12 where one client's ``logged`` updates got slower; those runs did not separate
    the design from the load.
    And handing work over at the end of the loop's step (``call_soon``, so the woken thread
    would not wait for the GIL the loop holds) made the hop slower (d2->d3 ~130 µs against ~100 µs under
    the same load), as the thread then also waited for the rest of the step.
    """

    def __init__(self, threads: int = 8, linger: float = LINGER) -> None:
        self._linger = linger
        self._threads = [_LogThread(i) for i in range(threads)]
        # Who may be handed work, and the work no thread was free for; all guarded by ``_lock``.
        self._lock = threading.Lock()
        self._idle: list[_LogThread] = []
        self._lingering: dict[_LogThread, None] = {}  # oldest first
        self._backlog: collections.deque[_Work] = collections.deque()
        self._current = threading.local()
        self._started = False
        # Finished work whose ``done`` the event loop has not run yet (appended by threads, run by the loop).
        self._completed: collections.deque[tuple[Done, BaseException | None, contextvars.Context]] = \
            collections.deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False

    def current(self) -> int | None:
        """In a log thread: its number (what :meth:`submit` takes as ``prefer``)."""
        number: int | None = getattr(self._current, "number", None)
        return number

    def submit(self, func: Callable[[], bool], done: Done, prefer: int | None = None,
               more: Callable[[], bool] | None = None) -> None:
        """Run ``func()`` in a log thread, then ``done(exception or None)`` on this event loop. The thread:
        ``prefer`` if it lingers after its last work (the job's previous batch ran there: :meth:`current`),
        else an idle one, else one lingering for another job, else the first to finish its work. ``more()``
        (asked in the thread once ``done`` is queued): whether work waits for ``done`` to run, so the
        loop is woken at once even though ``func`` answered everything itself."""
        if not self._started:
            self._started = True
            for t in self._threads:
                threading.Thread(target=self._work, args=(t,), name=f"autosaved-log-{t.number}", daemon=True).start()
                self._idle.append(t)
        # ``done`` runs in this caller's context, not the thread's: anyio finds its event loop through it.
        item = (func, asyncio.get_running_loop(), done, contextvars.copy_context(), more)
        with self._lock:
            thread: _LogThread | None = None
            if prefer is not None and self._threads[prefer].lingering:
                thread = self._threads[prefer]
            elif self._idle:
                thread = self._idle.pop()
            elif self._lingering:
                thread = next(iter(self._lingering))
            if thread is None:
                self._backlog.append(item)
                return
            if thread.lingering:
                thread.lingering = False
                del self._lingering[thread]
            thread.inbox.put(item)

    def settle(self) -> None:
        """On the event loop: run what finished work left to do here (cheap when nothing did)."""
        if self._completed:
            self._woken()

    def _woken(self) -> None:
        self._wake_pending = False  # before draining: a thread that saw it set relies on this drain
        while self._completed:
            done, error, context = self._completed.popleft()
            context.run(done, error)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        """From a thread: make the event loop settle soon (one wake-up for any number of completions)."""
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (the daemon is exiting)
            loop.call_soon_threadsafe(self._woken)

    def _work(self, me: _LogThread) -> None:
        self._current.number = me.number
        item: _Work | None = None
        while True:
            if item is None:
                item = me.inbox.get()  # idle: until work is handed over
            func, loop, done, context, more = item
            error: BaseException | None = None
            answered = False
            try:
                answered = func()
            except BaseException as exc:
                error = exc
            self._completed.append((done, error, context))
            # Records queued behind this batch (a second writer of the job) wait for ``done`` to start theirs:
            # lingering would leave them waiting for the next request or the linger's end.
            lingers = error is None and answered and not (more is not None and more())
            del item, func, done, error, context, more
            with self._lock:
                item = self._backlog.popleft() if self._backlog else None
                if item is None and lingers:
                    me.lingering = True
                    self._lingering[me] = None
                elif item is None:
                    self._idle.append(me)
            if not lingers or item is not None:
                self._wake(loop)  # nothing will settle it soon: wake the loop now
                continue
            try:
                item = me.inbox.get(timeout=self._linger)
            except queue.Empty:
                with self._lock:
                    if me.lingering:  # nobody handed it work meanwhile
                        me.lingering = False
                        del self._lingering[me]
                        self._idle.append(me)
                    else:  # handed work as the linger ran out: it is in the inbox already (put under the lock)
                        item = me.inbox.get_nowait()
            if self._completed:  # no request settled it meanwhile
                self._wake(loop)
            del loop


def wal_size(job: Job) -> int:
    return job.wal.size if job.wal is not None else 0


def _answer_synced(job: Job, batch: list[LogWaiter]) -> bool:
    """In the log thread, right after the batch's sync returned without error: answer the requests that
    allow it from here (the event loop's wake-up is then off their path; it still does the bookkeeping in
    ``_appended``). Reads ``job.durable`` (one dict lookup, atomic under the GIL) and never writes it.
    Whether every request of the batch was answered."""
    synced: dict[str, int] = {}
    for w in batch:
        for session, seq in w.record.sessions.items():
            synced[session] = max(synced.get(session, 0), seq)

    def durable(session: str) -> int:
        return max(job.durable.get(session, 0), synced.get(session, 0))

    answered = True
    for w in batch:
        if w.early is None:
            answered = False
            continue
        try:
            answered = w.early(durable) and answered
        except Exception:  # the event loop answers it instead
            answered = False
            log.exception("answering a logged update from the log thread failed job=%s", job.name)
    return answered


class LogCommitter:
    """Each job has one flusher at a time (``job.log_flushing``). An idle log starts its batch at once, from
    the request's own event-loop step, and the batch's completion callback answers the requests and starts
    the next batch: no task, no lock checkpoint. Only when the log's lock is taken (a save rotating or
    dropping segments, a delete) does a task wait for it and carry on from there."""

    def __init__(self, spawn: Callable[[Callable[[Job], object], Job], None], poke: Callable[[Job], None]) -> None:
        self._spawn = spawn
        self._poke = poke
        self._threads = SyncThreads()
        self.syncs = 0
        self.records = 0
        # Seconds per append + fdatasync (set by the daemon: the metrics' log sync histogram).
        self.observe_sync: Callable[[float], None] | None = None

    def enqueue(self, job: Job, waiter: LogWaiter) -> LogWaiter:
        """Queue a record; the caller takes it from the job in this same event-loop step (lsn order)."""
        job.log_pending.append(waiter)
        # A batch of this job synced meanwhile: its bookkeeping starts the next batch, with this record. After
        # the append: a log thread checks for pending records only after its completion is queued, so this
        # settle or that check sees the other (see SyncThreads.submit's ``more``).
        self._threads.settle()
        if not job.log_flushing:
            job.log_flushing = True
            self._next(job)
        return waiter

    def _next(self, job: Job) -> None:
        """The flusher's next step: the next batch now if the lock is free, a task that waits for it if not,
        or the end of this flusher when nothing is pending."""
        if not job.log_pending:
            job.log_flushing = False
        elif job.wal_lock.try_acquire():
            self._start(job)
        else:
            self._spawn(self._flush_later, job)

    def _start(self, job: Job) -> None:
        """With the lock held: take every pending record and append them with one sync in a log thread."""
        batch, job.log_pending = job.log_pending, []
        job.log_writing = batch  # their blobs may live in client slots: keep those lent
        records = [w.record for w in batch]
        try:
            append = self._prepare(job, batch)
        except Exception as exc:
            self._done(job, batch, self._failed(job, records, exc))
            return
        if isinstance(append, Exception):
            self._done(job, batch, append)
            return
        started = time.perf_counter()
        took: list[float] = []

        def timed() -> bool:
            job.log_thread = self._threads.current()  # its next batch prefers this thread (SyncThreads)
            answered = append()
            took.append(time.perf_counter() - started)
            return answered

        self._threads.submit(timed, lambda exc: self._appended(job, batch, exc, took), prefer=job.log_thread,
                             more=lambda: bool(job.log_pending))

    def settle(self) -> None:
        """On the event loop: finish the bookkeeping of batches synced since (see :class:`SyncThreads`)."""
        self._threads.settle()

    def _prepare(self, job: Job, batch: list[LogWaiter]) -> Callable[[], bool] | Exception:
        """What to run in the thread, or why this batch fails without any I/O."""
        records = [w.record for w in batch]
        wal = job.wal
        assert wal is not None
        if job.deleted:
            return NotFound(f"job {job.name!r} was deleted; this update was not applied")
        if job.wal_broken:
            return StorageError(f"write-ahead log of {job.name!r} is unavailable: {job.wal_broken}")
        rotate, job.rotate_log = job.rotate_log, False
        point("task", "logger", "before", job.name)
        # Encoded here, on the event loop (the lock held: no append of this log runs), not in the thread.
        framed = wal.frame(records, rotate=rotate)

        def append() -> bool:
            if rotate:
                wal.rotate()
            wal.append(records, framed)
            return _answer_synced(job, batch)

        return append

    def _appended(self, job: Job, batch: list[LogWaiter], exc: BaseException | None, took: list[float]) -> None:
        """Back on the event loop after the thread's append: what it made durable, or the job's log error."""
        records = [w.record for w in batch]
        if exc is None:
            for record in records:
                raise_durable(job, record.sessions)
            # Counted and timed together, on the loop: the thread answers first and leaves this bookkeeping
            # for later, and a scrape between the two saw one more sync timed than counted.
            self.syncs += 1
            if took and self.observe_sync is not None:
                self.observe_sync(took[0])
            self.records += len(records)
            if log_over(job.settings, wal_size(job), replay_speed.value):
                self._poke(job)  # the log a restart would replay reached its bound: save now (policy.log_bytes)
            self._done(job, batch, None)
        elif isinstance(exc, Exception):
            self._done(job, batch, self._failed(job, records, exc))
        else:  # not an error of the append (a KeyboardInterrupt): answer, and let the loop see it
            self._done(job, batch, StorageError(f"could not log the update of {job.name!r}: {exc!r}"))
            raise exc

    def _failed(self, job: Job, records: list[Record], exc: Exception) -> StorageError:
        """A failed append (or a bug on its way): this job's error, a snapshot follows, never the daemon's."""
        if not isinstance(exc, OSError):
            log.error("unexpected error appending to the log of job=%s", job.name, exc_info=exc)
        job.wal_broken = str(exc)
        job.wal_broken_lsn = records[-1].lsn
        job.explicit_requested = True  # a snapshot makes everything durable and restarts the log
        self._poke(job)
        log.error("write-ahead log append failed job=%s records=%d error=%s", job.name, len(records), exc)
        return StorageError(
            f"could not log the update of {job.name!r} ({exc}); it is held in memory and a snapshot "
            "is being saved", details={"errno": getattr(exc, "errno", None)},
        )

    def _done(self, job: Job, batch: list[LogWaiter], error: Exception | None) -> None:
        """Release the lock, answer the batch, and go on with the records that queued meanwhile."""
        job.log_writing = []
        job.wal_lock.release()
        for w in batch:
            if w.hold is not None:
                w.hold.release()  # written (or failed): its slots are the state's business now
            w.error = error
            if w.notify is not None:
                try:
                    w.notify()  # the reply goes out from here: no task waits per request
                except Exception:
                    log.exception("answering a logged update failed job=%s", job.name)
        self._next(job)

    async def _flush_later(self, job: Job) -> None:
        """The lock was taken: wait for it in a task, then carry on like an idle log."""
        try:
            await job.wal_lock.acquire()
        except BaseException:
            job.log_flushing = False
            raise
        self._start(job)
