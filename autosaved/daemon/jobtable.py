"""The job table: which jobs are loaded, and the locks that serialise loading, deleting and saving them.

Every read path goes through :meth:`JobTable.find` / :meth:`JobTable.get`, so a request sees exactly what a
restart's replay would rebuild. The table gets the few things it needs (the store, the current default
policy, the clock, the scheduler's wake-up and the replicator), never the daemon.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread

from ..config import PolicySettings
from ..errors import AutosavedError, StorageError
from ..state import Node, Touched, counted, empty_node
from ..storage.base import Storage
from ..storage.faults import point
from ..storage.local import JobStore, Recovered
from ..storage.wal import WalWriter
from ..storage.warm import warm
from .accounting import Ledger
from .jobcount import JobNames
from .jobs import Job, JobKey
from .keylocks import KeyedLocks, KeyedTurns
from .statecache import StateCache, stored_cost

if TYPE_CHECKING:
    from .replicator import Replicator

log = logging.getLogger("autosaved.daemon")


class JobTable:
    def __init__(self, store: Storage, *, policy: Callable[[], PolicySettings], clock: Callable[[], float],
                 poke: Callable[[Job], None], replicator: Replicator | None = None,
                 memory_limit: Callable[[], int] | None = None) -> None:
        self.store = store
        self.policy = policy
        self.clock = clock
        self.poke = poke
        self.replicator = replicator
        self.jobs: dict[JobKey, Job] = {}
        # The same jobs by owner: a user's listing or status reads theirs, never everyone's (issue 19).
        self.by_owner: dict[int, dict[str, Job]] = {}
        # What quota.max_jobs counts, per owner, kept up to date (jobcount.py).
        self.names = JobNames(lambda owner: {s.job for s in store.jobs(owner)},
                              lambda owner: list(self.by_owner.get(owner, ())))
        # What the held jobs' states cost, per owner, and which client slots they read: see accounting.py.
        self.ledger = Ledger()
        # The jobs' trees, within memory_limit (statecache.py).
        self.cache = StateCache(self.ledger, memory_limit or (lambda: 1 << 62), clock)
        # One lock per (owner, job) while in use: loading, deleting and recreating a job are serialised
        # by it, so no request is ever acknowledged for a job whose folder is being deleted.
        self._load_locks: KeyedLocks[JobKey] = KeyedLocks()
        # One io lock per (owner, job), whether the job is loaded or not: saves, gc and verify of a job
        # exclude each other through it (a loaded Job pins it as its io_lock until it is removed).
        self._io_locks: KeyedLocks[JobKey] = KeyedLocks()
        # Updates of a job not loaded yet, in the order they arrived: a later update of the key takes no
        # fast path while earlier ones still wait for the load (rpcupdate.py).
        self.update_turns: KeyedTurns[JobKey] = KeyedTurns()

    def __iter__(self) -> Iterator[Job]:
        return iter(list(self.jobs.values()))

    def add(self, job: Job) -> None:
        """Take a job in: from now on its state is charged to its owner."""
        assert job.key not in self.jobs and job.ledger is None
        self.jobs[job.key] = job
        job.io_lock = self._io_locks.pin(job.key)  # the key's io lock, kept while the job is loaded
        self.by_owner.setdefault(job.owner, {})[job.name] = job
        self.names.add(job.owner, job.name)
        job.ledger = self.ledger
        self.ledger.attach(job.owner, job.root)
        job.cache = self.cache
        self.cache.add(job, loaded=job.latest_version is not None)

    def remove(self, key: JobKey) -> None:
        """Let a job go (delete): its state is no longer charged to its owner."""
        job = self.jobs.pop(key, None)
        if job is not None:
            self._io_locks.unpin(key)
        mine = self.by_owner.get(key[0])
        if job is not None and mine is not None and mine.get(key[1]) is job:
            del mine[key[1]]
            if not mine:
                del self.by_owner[key[0]]
        if job is not None and job.ledger is not None:
            job.ledger.detach(job.owner, job.root)
            job.ledger = None
        if job is not None and job.cache is not None:
            job.cache.remove(job)
            job.cache = None

    def jobs_of(self, owner: int | None) -> list[Job]:
        """The loaded jobs of ``owner`` (every one for ``None``): O(what is returned)."""
        if owner is None:
            return list(self.jobs.values())
        return list(self.by_owner.get(owner, {}).values())

    def folder_gone(self, owner: int, name: str) -> None:
        """A job's folder was deleted: it no longer counts for ``quota.max_jobs`` (unless loaded again)."""
        if (owner, name) not in self.jobs:
            self.names.forget(owner, name)

    def surely_absent(self, key: JobKey) -> bool:
        """Whether job ``key`` certainly does not exist on this host (issue 19: a flood of deletes of random
        names each took a worker thread to look for a folder): not loaded, nobody loading, creating or
        deleting it, and not among its owner's job names. O(1)."""
        return key not in self.jobs and key not in self._load_locks and self.names.surely_absent(*key)

    def key_lock(self, key: JobKey) -> AbstractAsyncContextManager[None]:
        return self._load_locks.hold(key)

    def io_lock(self, key: JobKey) -> AbstractAsyncContextManager[None]:
        return self._io_locks.hold(key)

    def locks_held(self) -> int:
        """Locks the table holds now (bounded by jobs loaded plus requests in flight; issue 19, defect 9)."""
        return len(self._load_locks) + len(self._io_locks) + len(self.update_turns)

    async def find(self, owner: int, name: str) -> Job | None:
        """The job, loaded (log replayed) if it exists on disk, or ``None`` if there is no such job."""
        job = self.jobs.get((owner, name))
        if job is not None:
            return job
        store = self.store.job(owner, name)
        # A fresh host: a job only the bucket has is loaded from there (get seeds it), as for a trainer.
        if not await anyio.to_thread.run_sync(store.path.exists) and (
                self.replicator is None or not await self.replicator.in_bucket(owner, name)):
            return None
        return await self.get(owner, name)

    async def get(self, owner: int, name: str) -> Job:
        """The job, loaded from disk or created empty."""
        key = (owner, name)
        job = self.jobs.get(key)
        if job is not None and not job.deleted:
            return job
        async with self.key_lock(key):  # held by a delete of this job until its folder is gone
            job = self.jobs.get(key)
            if job is not None:
                return job
            store = self.store.job(owner, name)
            if self.replicator is not None and not await anyio.to_thread.run_sync(store.version_ids):
                # A fresh host (or a job this host never had): start from the bucket's newest version. The
                # replicator writes chunk files, so it seeds through its own handle on the local store.
                await self.replicator.seed(owner, name, self.replicator.local_store(owner, name))

            def load() -> tuple[Recovered | None, list[int], int]:
                point("load", "job", "before", name)
                store.clean_tmp()
                recovered = store.recover(load_data=False, repair=True)
                stored = 0
                if recovered is not None:
                    # Counted once here, in the thread: from now on every change keeps the counts.
                    recovered.tree = counted(recovered.tree) if recovered.tree else empty_node()
                    stored = stored_cost(recovered.tree)
                    if recovered.version is not None and not recovered.replay.records:
                        _warm(store, recovered.version.info.id, recovered.tree)
                return recovered, store.version_ids(), stored

            try:
                recovered, ids, stored = await anyio.to_thread.run_sync(load)
            except OSError as exc:
                raise StorageError(f"cannot open job {name!r}: {exc}") from exc
            log_bytes = recovered.replay.bytes if recovered is not None else 0
            job = Job(owner=owner, name=name, store=store, settings=self.policy(),
                      wal=WalWriter(store.log_dir, size=log_bytes))
            if recovered is not None:
                job.root = recovered.tree
                job.stored_cost = stored
                job.sessions = dict(recovered.sessions)
                job.durable = dict(recovered.sessions)
                job.step = recovered.step
                job.meta = dict(recovered.meta)
                job.last_lsn = recovered.replay.max_lsn
                if recovered.version is not None:
                    job.latest_version = recovered.version.info.id
                    if not recovered.replay.records:  # the tree is that version's: the next save diffs the change
                        job.touched_base = job.latest_version
                    job.last_save_time = recovered.version.info.time
                    job.last_lsn = max(job.last_lsn, recovered.version.wal_lsn)
                if recovered.replay.records:
                    # Logged deltas newer than the newest version: save them as a version soon.
                    now = self.clock()
                    job.generation = 1
                    job.dirty_since = job.last_update_at = now
                    # A replayed log is saved at once (reason ``recovery``): a daemon that crashes again
                    # before a busy stream ever lets ``idle`` or ``interval`` fire must not replay more.
                    job.recovery_pending = True
                    self.poke(job)  # the scheduler plans this job's save now, not at some unrelated wake-up
                log.info("loaded job=%s owner=%d version=%s replayed_log_records=%d", name, owner,
                         job.latest_version, len(recovered.replay.records))
            job.next_version = ids[-1] + 1 if ids else 1
            self.add(job)
            if self.replicator is not None:
                self.replicator.attach(owner, name, ids)
            return job

    async def make_resident(self, job: Job) -> None:
        """Load an evicted job's tree back from its newest version (the caller holds ``job.reload_lock``
        and a pin): exactly the state it had, which that version holds (only a clean job is evicted). A
        version that cannot be read is the request's error; the job stays evicted and is never served from
        an older version."""
        if job.resident:
            self.cache.hit(job)
            return
        version = job.latest_version
        assert version is not None
        store = job.store

        def load() -> tuple[Node, int]:
            point("load", "job", "before", job.name)
            loaded = store.load(version, load_data=False, verify=False)
            tree = counted(loaded.tree) if loaded.tree else empty_node()
            _warm(store, version, tree)
            return tree, stored_cost(tree)

        try:
            root, stored = await anyio.to_thread.run_sync(load)
        except AutosavedError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot load job {job.name!r} back: {exc}") from exc
        if job.deleted or self.jobs.get(job.key) is not job:
            raise StorageError(f"job {job.name!r} was deleted")
        self.cache.reloaded(job, root, stored)
        job.touched, job.touched_base = Touched(), version
        log.info("loaded job=%s owner=%d version=%d back into the state cache", job.name, job.owner, version)

    @asynccontextmanager
    async def use(self, job: Job) -> AsyncIterator[Job]:
        """The job with its tree resident and pinned (not evicted) while the caller uses it."""
        job.pins += 1
        try:
            async with job.reload_lock:
                await self.make_resident(job)
            yield job
        finally:
            job.pins -= 1
            self.cache.settle()

    def job_saved(self, job: Job) -> None:
        """A save of ``job`` ended: the scheduler decides for it again, and if the save made it clean the
        cache may evict (it, or states used less recently)."""
        self.poke(job)
        self.cache.settle()

    def forget_if_unused(self, job: Job) -> None:
        """Drop a job that ``get`` created for a request that was then refused: nothing was ever accepted
        into it, so it must not show in ``list`` as an empty job (issue 22), nor keep a ``quota.max_jobs``
        slot until a restart (issue 19): its name leaves the count too, unless its folder is on disk (a
        stat, on this rare path only)."""
        if (self.jobs.get(job.key) is job and job.generation == 0 and job.latest_version is None
                and not job.saving and not job.waiters and not job.log_pending and not job.log_writing):
            if job.wal is not None:
                job.wal.close()
            self.remove(job.key)
            if not job.store.path.exists():
                self.folder_gone(job.owner, job.name)

    async def replicate_stored_jobs(self, replicator: Replicator) -> None:
        """With ``[remote]``, every job on disk is attached at start: a backlog a crash left behind goes up
        without waiting for the job's trainer to come back (and is protected from retention meanwhile)."""
        replicator.resume_deletes()  # and bucket deletes a previous run left pending complete

        def scan() -> list[tuple[int, str, list[int]]]:
            return [(s.owner, s.job, s.version_ids()) for s in self.store.jobs()]

        try:
            found = await anyio.to_thread.run_sync(scan)
        except OSError as exc:
            log.warning("could not list the stored jobs to replicate: %s", exc)
            return
        for owner, name, ids in found:
            if ids:
                replicator.attach(owner, name, ids)


def _warm(store: object, version: int, tree: Node) -> None:
    """The next format-2 save of a loaded job diffs against the tree just loaded (storage/warm.py)."""
    if isinstance(store, JobStore):
        try:
            warm(store, version, tree)
        except (AutosavedError, OSError) as exc:  # the next save re-encodes the whole state: slower, not wrong
            log.warning("job=%s: could not keep the loaded tree for the next save: %s", store.job, exc)
