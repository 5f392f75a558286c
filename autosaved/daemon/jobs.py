"""The daemon's job table: the latest state of every job it serves, and what is not yet saved."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio

from ..backoff import backoff
from ..config import PolicySettings
from ..policy import JobView, SaveReason
from ..state import (
    Merged,
    Node,
    Refs,
    State,
    Touched,
    add_refs,
    changes_anything,
    empty_node,
    merge_counted,
    merge_deltas_into,
    touch,
    touched_union,
)
from ..storage.base import JobStorage
from ..storage.wal import Record, WalWriter, replay_speed
from .accounting import Hold, Ledger
from .loglock import LogLock

if TYPE_CHECKING:
    from .statecache import StateCache

# A job is named by (owner uid, job name) everywhere in the daemon.
JobKey = tuple[int, str]


@dataclass
class LogWaiter:
    """A logged request waiting for its record's fsync (shared with the others in its group commit)."""

    record: Record
    error: Exception | None = None
    # Called (on the event loop) once the record's batch is synced or failed: the rpc layer answers from it.
    notify: Callable[[], None] | None = None
    # Called in the log thread right after the sync, with the sessions' durable seqs (``durable(session)``):
    # sends the reply from there, ahead of ``notify`` (issue 21); whether it was sent.
    early: Callable[[Callable[[str], int]], bool] | None = None
    # The client slots the record reads until it is written (released when its batch is done).
    hold: Hold | None = None


@dataclass
class CommitWaiter:
    """A request waiting until a committed version covers ``generation``."""

    generation: int
    done: anyio.Event = field(default_factory=anyio.Event)
    version: int | None = None
    error: Exception | None = None


@dataclass
class Job:
    owner: int
    name: str
    store: JobStorage
    settings: PolicySettings
    # The client's raw policy overrides, kept so a config reload can recompute ``settings`` on new defaults.
    policy_overrides: dict[str, Any] | None = None
    # Every mapping of the state is a counted Node (state.py): its size is known without a walk.
    root: Node = field(default_factory=empty_node)
    # The daemon-wide counters this job's state is charged to, while the job table holds the job.
    ledger: Ledger | None = None
    # Every applied update increments ``generation``; a save commits the generation it snapshotted.
    generation: int = 0
    saved_generation: int = 0
    # The live tree's merge generation (state.merge_counted): mappings built since the last snapshot are
    # changed in place by the next update; a snapshot starts a new one, so a tree it holds never changes.
    merge_gen: int = 1
    # The paths updates changed since the tree of version ``touched_base`` (a snapshot's, or the one the
    # tree was loaded from; ``None``: unknown): a format-2 save of the next snapshot diffs only those.
    touched: Touched = field(default_factory=Touched)
    touched_base: int | None = None
    dirty_bytes: int = 0
    dirty_since: float | None = None
    last_update_at: float | None = None
    last_save_at: float | None = None
    retry_at: float | None = None
    failures: int = 0
    explicit_requested: bool = False
    # Loaded by replaying log records no version covers: saved at once (policy reason ``recovery``).
    recovery_pending: bool = False
    saving: bool = False
    step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    # session id → seq of the last update applied (``sessions``) / covered by the newest version (``durable``)
    sessions: dict[str, int] = field(default_factory=dict)
    durable: dict[str, int] = field(default_factory=dict)
    next_version: int = 1
    latest_version: int | None = None
    last_save_reason: str | None = None
    last_save_time: str | None = None
    last_error: str | None = None
    saves: int = 0
    bytes_written: int = 0
    # For `autosaved top`: the newest save's duration, and the running save's bytes written so far (a
    # worker thread adds to it) and its start (daemon clock).
    last_save_duration_s: float | None = None
    save_written: int = 0
    save_started_at: float | None = None
    waiters: list[CommitWaiter] = field(default_factory=list)
    io_lock: anyio.Lock = field(default_factory=anyio.Lock)
    # Write-ahead log. ``unlogged`` is every delta since the last point the log or a committed version
    # covered, merged into one; the next logged record carries it (see storage/wal.py).
    wal: WalWriter | None = None
    wal_lock: LogLock = field(default_factory=LogLock)
    unlogged: State = field(default_factory=dict)
    unlogged_sessions: dict[str, int] = field(default_factory=dict)
    unlogged_generation: int = 0
    # Slot references of the leaves the deltas in ``unlogged`` brought (taken over by the next record).
    # A superset of what ``unlogged`` still reads (a leaf replaced within the window is counted until
    # the record is written): knowing exactly would need a walk of the record.
    unlogged_refs: Refs | None = None
    last_lsn: int = 0
    rotate_log: bool = False
    wal_broken: str | None = None
    # A snapshot covering this lsn (the last record of the failed batch) must commit before logging resumes.
    wal_broken_lsn: int = 0
    log_pending: list[LogWaiter] = field(default_factory=list)
    log_writing: list[LogWaiter] = field(default_factory=list)
    log_flushing: bool = False
    # The log thread that synced its last batch: its next one goes there if that thread is idle (walcommit).
    log_thread: int | None = None
    # Set by ``delete`` (under the job's key lock): nothing may be acknowledged for it or written into its
    # folder any more; a request for the job waits for the delete and then starts a new job.
    deleted: bool = False
    # The state cache (statecache.py): whether ``root`` is the state or an evicted job's stub, the cache's
    # estimate of the tree's memory, the encoded size of its leaves only in chunk files (at load), the
    # last use, requests using the tree now (pins) and updates queued behind a reload (kept in order by
    # ``reload_lock``, the innermost lock: held only while the tree loads and such an update applies).
    cache: StateCache | None = None
    resident: bool = True
    cache_bytes: int = 0
    stored_cost: int = 0
    last_used: float = 0.0
    pins: int = 0
    queued_updates: int = 0
    reload_lock: anyio.Lock = field(default_factory=anyio.Lock)

    @property
    def key(self) -> JobKey:
        return (self.owner, self.name)

    @property
    def dirty(self) -> bool:
        return self.generation > self.saved_generation

    def plan(self, delta: State) -> Merged:
        """The merge of ``delta`` and what it changes, without applying it (path copying: nothing shared
        is touched), so a quota can refuse it first."""
        assert self.resident, "an evicted job's tree must be loaded back first"
        return merge_counted(self.root, delta)

    def set_root(self, root: Node) -> None:
        if self.ledger is not None:
            self.ledger.detach(self.owner, self.root)
            self.ledger.attach(self.owner, root)
        self.root = root

    def apply(self, delta: State, *, session: str, seq: int, step: int | None, meta: dict[str, Any] | None,
              size: int, now: float, merged: Merged | None = None, changes: bool | None = None) -> int:
        """Merge one delta (``merged``: its :meth:`plan`, when the caller made it); returns the new
        generation. Runs in one event-loop step, so it is atomic. An update that changes nothing (same
        values, a DELETE of a missing key) leaves the job clean: it makes no version (issue 22).
        ``changes``: whether ``delta`` changes the current root, when the caller computed it (offload.py)."""
        self.sessions[session] = seq
        self.unlogged_sessions[session] = seq
        if not self._changes(delta, step, meta, changes):
            return self.generation
        if self.touched_base is not None:
            touch(self.touched, self.root, delta)  # before the merge, which may change the root in place
        if merged is None:
            merged = merge_counted(self.root, delta, self.merge_gen)
        if self.ledger is not None:
            self.ledger.apply(self.owner, merged)
        self.root = merged.root
        self.unlogged_refs = add_refs(self.unlogged_refs, merged.added_refs)
        self.generation += 1
        self.unlogged = merge_deltas_into(self.unlogged, delta)
        self.unlogged_generation = self.generation
        if step is not None:
            self.step = step
        if meta:
            self.meta.update(meta)
        self.dirty_bytes += size
        if self.dirty_since is None:
            self.dirty_since = now
        self.last_update_at = now
        if self.cache is not None:  # after the job turned dirty: a dirty job is never evicted
            self.cache.changed(self)
        return self.generation

    def _changes(self, delta: State, step: int | None, meta: dict[str, Any] | None, changes: bool | None) -> bool:
        # A new job's first update counts whatever it holds: the job exists from then on (issue 22).
        return ((self.generation == 0 and self.latest_version is None)
                or (step is not None and step != self.step)
                or (bool(meta) and any(k not in self.meta or self.meta[k] != v for k, v in (meta or {}).items()))
                or (changes if changes is not None else changes_anything(self.root, delta)))

    def take_log_record(self) -> Record:
        """The next log record: everything not yet covered by the log or a commit. Taken in the same
        event-loop step as the apply, so records reach the log in lsn order."""
        self.last_lsn += 1
        record = Record(lsn=self.last_lsn, sessions=dict(self.unlogged_sessions), step=self.step,
                        meta=dict(self.meta), delta=self.unlogged)
        self.unlogged = {}
        self.unlogged_sessions = {}
        return record

    def take_log_hold(self) -> Hold:
        """The slot references of the record :meth:`take_log_record` just took (kept until it is written)."""
        refs, self.unlogged_refs = self.unlogged_refs, None
        return self.ledger.hold(refs) if self.ledger is not None else Hold(None, None)

    def view(self) -> JobView:
        return JobView(
            settings=self.settings,
            dirty=self.dirty,
            dirty_bytes=self.dirty_bytes,
            dirty_since=self.dirty_since,
            last_update_at=self.last_update_at,
            last_save_at=self.last_save_at,
            explicit_requested=self.explicit_requested,
            saving=self.saving,
            not_before=self.retry_at,
            log_bytes=self.wal.size if self.wal is not None else 0,
            replay_speed=replay_speed.value,
            recovery_pending=self.recovery_pending,
        )

    def finish_waiters(self, error: Exception | None = None) -> None:
        """Release waiters the newest commit covers (or all of them, with ``error``)."""
        keep = []
        for w in self.waiters:
            if error is not None:
                w.error = error
                w.done.set()
            elif w.generation <= self.saved_generation:
                w.version = self.latest_version
                w.done.set()
            else:
                keep.append(w)
        self.waiters = keep

    def held_bytes(self) -> int:
        """Bytes of state this job keeps in daemon memory (stored-only leaves excluded): a counter."""
        return self.root.held

    def status(self) -> dict[str, Any]:
        return {
            "job": self.name,
            "owner": self.owner,
            "dirty": self.dirty,
            "dirty_bytes": self.dirty_bytes,
            "saving": self.saving,
            "step": self.step,
            "latest_version": self.latest_version,
            "last_save_time": self.last_save_time,
            "last_save_reason": self.last_save_reason,
            "saves": self.saves,
            "bytes_written": self.bytes_written,
            "held_bytes": self.held_bytes(),
            "state_bytes": self.root.cost,
            "resident": self.resident,
            "cache_bytes": self.cache_bytes,
            "last_error": self.last_error,
            "wal_lsn": self.last_lsn,
            "wal_bytes": self.wal.size if self.wal is not None else 0,
            "wal_error": self.wal_broken,
            "last_save_duration_s": self.last_save_duration_s,
            "save_written": self.save_written if self.saving else None,
            "policy": self.settings.to_wire(),
        }


@dataclass(frozen=True)
class SaveTicket:
    """What a save took from a job at snapshot time; everything the writer needs, nothing it can race on."""

    job: Job
    reason: SaveReason
    version: int
    generation: int
    root: State
    step: int | None
    meta: dict[str, Any]
    sessions: dict[str, int]
    dirty_bytes: int
    dirty_since: float | None
    started_at: float
    wal_lsn: int
    # The client slots the snapshot reads until it is written (released by the writer).
    hold: Hold = field(default_factory=lambda: Hold(None, None))
    # The paths changed since the tree of an earlier version (see Job.touched), for the store.
    changed: tuple[int, Touched] | None = None


def take_snapshot(job: Job, reason: SaveReason, now: float) -> SaveTicket:
    ticket = SaveTicket(
        job=job, reason=reason, version=job.next_version, generation=job.generation, root=job.root,
        step=job.step, meta=dict(job.meta), sessions=dict(job.sessions), dirty_bytes=job.dirty_bytes,
        dirty_since=job.dirty_since, started_at=now, wal_lsn=job.last_lsn,
        hold=job.ledger.hold(job.root.refs) if job.ledger is not None else Hold(None, None),
        changed=(job.touched_base, job.touched) if job.touched_base is not None else None,
    )
    job.touched, job.touched_base = Touched(), job.next_version
    # Records after this snapshot go to a new segment, so the commit can drop the old ones whole.
    job.rotate_log = True
    job.merge_gen += 1  # the ticket holds the root: from now on updates copy what they change, once
    job.next_version += 1
    job.saving = True
    job.explicit_requested = False
    job.recovery_pending = False
    job.dirty_bytes = 0
    job.dirty_since = None
    return ticket


def commit_succeeded(ticket: SaveTicket, time_iso: str, bytes_written: int) -> None:
    job = ticket.job
    job.saving = False
    job.saved_generation = max(job.saved_generation, ticket.generation)
    job.latest_version = ticket.version
    raise_durable(job, ticket.sessions)
    if job.wal_broken and ticket.wal_lsn >= job.wal_broken_lsn:
        job.wal_broken = None
    if ticket.generation >= job.unlogged_generation:
        job.unlogged = {}
        job.unlogged_sessions = {}
        job.unlogged_refs = None
    job.last_save_at = ticket.started_at
    job.last_save_reason = str(ticket.reason)
    job.last_save_time = time_iso
    job.last_error = None
    job.failures = 0
    job.retry_at = None
    job.saves += 1
    job.bytes_written += bytes_written
    if not job.dirty:
        job.dirty_since = None
    job.finish_waiters()


def raise_durable(job: Job, sessions: dict[str, int]) -> None:
    """Record that these session seqs survive a crash now (never lowering what the log already made so)."""
    for session, seq in sessions.items():
        job.durable[session] = max(job.durable.get(session, 0), seq)


def commit_failed(ticket: SaveTicket, error: Exception, now: float) -> None:
    """Put back what the snapshot took, so the state is saved again after a backoff."""
    job = ticket.job
    job.saving = False
    if job.touched_base == ticket.version:
        # The store still holds the tree this ticket's paths were relative to: they go to the next save.
        job.touched_base = ticket.changed[0] if ticket.changed is not None else None
        if ticket.changed is not None:
            job.touched = touched_union(ticket.changed[1], job.touched)
    job.dirty_bytes += ticket.dirty_bytes
    if ticket.dirty_since is not None:
        job.dirty_since = ticket.dirty_since if job.dirty_since is None else min(job.dirty_since, ticket.dirty_since)
    job.failures += 1
    job.retry_at = now + backoff(job.failures - 1, base=1.0, cap=60.0)  # jittered: hosts do not retry in step
    job.last_error = str(error)
    if ticket.reason in (SaveReason.EXPLICIT, SaveReason.SHUTDOWN):
        # Policy-triggered saves fire again by themselves; a requested one must be retried explicitly.
        job.explicit_requested = True
    if ticket.reason is SaveReason.RECOVERY:
        job.recovery_pending = True
    job.finish_waiters(error)
