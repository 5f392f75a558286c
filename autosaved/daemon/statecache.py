"""The daemon's bounded cache of job states (issue 20 item 3): all jobs share ``memory_limit``.

A job the daemon serves keeps its record (:class:`~autosaved.daemon.jobs.Job`: policy, sessions, step,
meta, counters, log writer) for as long as it is loaded; its *state*, the tree below its root, is the
cache's. A clean job whose newest version holds exactly its state may lose its tree (eviction): the job
keeps a stub root that carries the state's cost (so ``quota.max_bytes`` still counts it and ``status``
still shows it) and nothing else, and the next request that needs the tree (an update, a restore) loads
it back from that version first (:meth:`JobTable.make_resident`). ``status`` needs no tree.

What may go (:func:`evictable`): a job with nothing that is not in its newest committed version. A dirty
job, one being saved, one with log records not yet synced or a delta not yet logged, one without a
version, one a request is using (pins) or whose io lock is held (a restore reading its leaves, gc) stays.

Which go (:func:`plan_evictions`, a pure function of sizes, pins and the clock): least recently used
first, until the cache is within its limit; the most recently used state always stays (so the cache may
exceed its limit by the dirty jobs and that one). The order is kept by an ordered dict (a use moves a job to
its end), so a pass visits the jobs it evicts plus the pinned ones it skips, never every job.

**What a job costs here** (:func:`resident_estimate`): not its encoded size (a trainer's gigabyte of
tensors that live only in chunk files costs the daemon a few hundred bytes each), but an estimate of the
Python memory its tree holds: the bytes of binary leaves in daemon memory (``held``) plus
:data:`RESIDENT_PER_COST` times the encoded size of everything else (keys, scalars, containers). The
tree alone measured 1.8x (flat maps of long strings) to 4.8x (many small maps) under tracemalloc; with
what the store keeps for the next format-2 save, the daemon's RSS grew by 6.4x the encoded size of 400
saved 30 KB agent-progress states, so 6. The size of
leaves stored only in chunk files is measured when the state is loaded; one replaced since still counts
as stored until the job's next load (an underestimate until then, never an overestimate that evicts
early). Each job's share is charged to its owner in the ledger (``cache_bytes``), beside its quota bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import psutil

from ..state import BLOB_OVERHEAD, Node, empty_node
from ..storage.statepages import leaves_of
from ..tree import Blob

if TYPE_CHECKING:
    from .accounting import Ledger
    from .jobs import Job, JobKey

RESIDENT_PER_COST: Final = 6
# ``memory_limit = "auto"``: an eighth of the host's memory, at least this.
AUTO_FLOOR: Final = 64 * 1024**2
AUTO_FRACTION: Final = 8


_TOTAL_MEMORY: list[int] = []


def memory_limit(configured: int | None, total_memory: int | None = None) -> int:
    """The cache's limit in bytes: ``memory_limit`` as configured, or for "auto" (``None``) an eighth of
    the host's memory, at least :data:`AUTO_FLOOR`."""
    if configured is not None:
        return configured
    if total_memory is None:
        if not _TOTAL_MEMORY:
            _TOTAL_MEMORY.append(psutil.virtual_memory().total)
        total_memory = _TOTAL_MEMORY[0]
    return max(AUTO_FLOOR, total_memory // AUTO_FRACTION)


def resident_estimate(cost: int, held: int, stored: int) -> int:
    """Bytes of daemon memory a state of encoded size ``cost`` holds, ``held`` of them binary leaves in
    memory and ``stored`` the encoded size of leaves that live only in chunk files."""
    return held + RESIDENT_PER_COST * max(0, cost - held - stored)


def stored_cost(tree: Any) -> int:
    """The encoded size of the leaves of ``tree`` that live only in chunk files (a walk: at load only)."""
    # A packed subtree holds no such leaf (autosaved.state): it stays unopened.
    return sum(b.nbytes + BLOB_OVERHEAD for b in leaves_of(tree) if isinstance(b, Blob) and b.data is None)


@dataclass(frozen=True)
class Entry:
    """One resident state, as the eviction policy sees it."""

    key: Hashable
    nbytes: int
    last_used: float
    pinned: bool


def plan_evictions(entries: Iterable[Entry], total: int, limit: int, now: float, min_idle: float = 0.0
                   ) -> list[Hashable]:
    """The states to evict so that ``total`` (all resident states, pinned ones included) fits ``limit``:
    ``entries`` least recently used first; pinned ones and those used less than ``min_idle`` seconds ago
    stay. Stops at the first fit, so it reads only the entries it evicts or skips (``entries`` may be
    lazy). When pinned states alone exceed the limit, it evicts every unpinned one and the rest stays over."""
    out: list[Hashable] = []
    for entry in entries:
        if total <= limit:
            break
        if entry.pinned or now - entry.last_used < min_idle:
            continue
        out.append(entry.key)
        total -= entry.nbytes
    return out


def evictable(job: Job) -> bool:
    """Whether the job's state is all in its newest committed version and nothing uses its tree now."""
    return (job.resident and not job.dirty and not job.saving and job.latest_version is not None
            and not job.deleted and not job.recovery_pending and job.pins == 0 and job.queued_updates == 0
            and not job.waiters and not job.log_pending and not job.log_writing and not job.unlogged
            and job.unlogged_refs is None and job.wal_broken is None and not job.io_lock.locked())


def stub_root(cost: int) -> Node:
    """An evicted job's root: no entries, the state's cost (what quota and status read), nothing held."""
    node = empty_node()
    node.cost = cost
    return node


class StateCache:
    """Which jobs' states are resident, their estimated sizes, and the counters ``status`` shows."""

    def __init__(self, ledger: Ledger, limit: Callable[[], int], clock: Callable[[], float]) -> None:
        self.ledger = ledger
        self.limit = limit
        self.clock = clock
        self.lru: OrderedDict[JobKey, Job] = OrderedDict()
        self.total = 0
        self.hits = 0
        self.loads = 0
        self.evictions = 0
        self.evicted_jobs = 0  # loaded jobs whose state is not resident now
        self.path_reads = 0  # restores by path of an evicted job, served from its pages without a load

    # -- bookkeeping --------------------------------------------------------------------------------

    def _charge(self, job: Job, nbytes: int) -> None:
        change = nbytes - job.cache_bytes
        job.cache_bytes = nbytes
        self.total += change
        self.ledger.charge_cache(job.owner, change)

    def _measure(self, job: Job) -> int:
        return resident_estimate(job.root.cost, job.root.held, job.stored_cost)

    def add(self, job: Job, *, loaded: bool) -> None:
        """A job the table takes in, its state resident (``loaded``: read from disk)."""
        self.lru[job.key] = job
        job.last_used = self.clock()
        self._charge(job, self._measure(job))
        self.loads += loaded
        self.settle()

    def remove(self, job: Job) -> None:
        """A job the table lets go (delete)."""
        if self.lru.pop(job.key, None) is None and not job.resident:
            self.evicted_jobs -= 1
        self._charge(job, 0)

    def hit(self, job: Job) -> None:
        """A request found the job's state resident."""
        self.hits += 1
        self.used(job)

    def used(self, job: Job) -> None:
        if job.key in self.lru:
            self.lru.move_to_end(job.key)
        job.last_used = self.clock()

    def changed(self, job: Job) -> None:
        """An update changed the job's root (O(1): the root's totals are counters)."""
        self.used(job)
        self._charge(job, self._measure(job))
        self.settle()

    # -- eviction ------------------------------------------------------------------------------------

    def _entries(self) -> Iterator[Entry]:
        """The resident states, least recently used first, but for the most recently used one, which
        always stays: a job larger than the whole limit would otherwise be evicted after each save and
        loaded back whole at its next request (the cache is then over its limit by that one job)."""
        newest = next(reversed(self.lru), None)
        for key, job in self.lru.items():
            if key != newest:
                yield Entry(key, job.cache_bytes, job.last_used, not evictable(job))

    def settle(self) -> None:
        """Evict least recently used states until the cache fits its limit (nothing when it fits)."""
        limit = self.limit()
        if self.total <= limit:
            return
        for key in plan_evictions(self._entries(), self.total, limit, self.clock()):
            self.evict(self.lru[key])  # type: ignore[index]

    def evict(self, job: Job) -> None:
        """Drop the job's tree (its newest version holds it): a stub root keeps its cost."""
        assert evictable(job), job.key
        stub = stub_root(job.root.cost)
        if job.ledger is not None:
            job.ledger.detach(job.owner, job.root)  # held bytes and slot references go; the cost comes back:
            job.ledger.attach(job.owner, stub)
        job.root = stub
        job.resident = False
        job.stored_cost = 0
        drop_store_caches(job)
        del self.lru[job.key]
        self._charge(job, 0)
        self.evictions += 1
        self.evicted_jobs += 1

    def reloaded(self, job: Job, root: Node, stored: int) -> None:
        """The job's tree, loaded back from its newest version."""
        if job.ledger is not None:
            job.ledger.detach(job.owner, job.root)
            job.ledger.attach(job.owner, root)
        job.root = root
        job.resident = True
        job.stored_cost = stored
        self.evicted_jobs -= 1
        self.add(job, loaded=True)

    def status(self) -> dict[str, Any]:
        return {"bytes": self.total, "limit": self.limit(), "resident_jobs": len(self.lru),
                "evicted_jobs": self.evicted_jobs, "hits": self.hits, "loads": self.loads,
                "evictions": self.evictions, "path_reads": self.path_reads}


def drop_store_caches(job: Job) -> None:
    """What the job's store keeps in memory for the next save (format 2: the last tree written, its leaf
    page refs, gc's memo of page links and its reference counts) goes with the tree; a reload warms it again
    (storage/warm.py; the counts come back by one full mark at the next collection)."""
    store: Any = job.store
    if hasattr(store, "paged_cache"):
        store.paged_cache = None
    if hasattr(store, "page_refs"):
        store.page_refs = {}
    if hasattr(store, "fresh_links"):
        store.fresh_links = {}
    if hasattr(store, "live"):
        store.live.forget()  # gc's reference counts (storage/gcmark.py): rebuilt by one full mark
