"""The admin handlers: status, list, verify, gc and delete, of one job or of every job of the owner
(all owners for root).
"""

from __future__ import annotations

import functools
from typing import Any

import anyio
import anyio.to_thread

from ..errors import NotFound, ProtocolError
from ..names import validate_job_name
from ..storage.base import JobStorage
from ..storage.faults import point
from .jobs import Job
from .rpcbase import HandlerBase, Reply, RpcRequest, Started, log


class AdminOps(HandlerBase):
    """The ``status``, ``list``, ``verify``, ``gc`` and ``delete`` ops."""

    async def op_status(self, req: RpcRequest) -> Reply:
        job_name = req.header.get("job")
        if job_name is None:
            return Reply(self.ctx.status(None if req.owner in (0, self.ctx.uid) else req.owner))
        name = validate_job_name(job_name)
        job = await self.ctx.table.find(req.owner, name)  # loaded if on disk: dirty/step include replayed records
        if job is None and req.header.get("missing_ok") is True:
            # A Client asking before its first update: an empty job's status, creating nothing.
            settings = self._requested_policy(req)
            empty = Job(owner=req.owner, name=name, store=self.ctx.table.store.job(req.owner, name), settings=settings)
            return Reply({**empty.status(), "live": True, "exists": False})
        if job is None:
            raise NotFound(f"no job named {name!r}")
        remote = {"remote": self.ctx.replicator.status(job.key)} if self.ctx.replicator is not None else {}
        return Reply({**job.status(), "live": True, **remote})

    async def op_list(self, req: RpcRequest) -> Reply:
        job_name = req.header.get("job")
        if job_name is None:
            owner = None if req.owner == 0 else req.owner
            return Reply({"jobs": await anyio.to_thread.run_sync(lambda: self.ctx.list_jobs(owner))})
        store = self.ctx.table.store.job(req.owner, validate_job_name(job_name))
        job = await self.ctx.table.find(req.owner, store.job)
        if job is None:
            raise NotFound(f"no job named {store.job!r}")
        best_rule = job.settings.keep_best
        async with job.io_lock:  # no retention or gc of this job while its versions are read
            infos = await anyio.to_thread.run_sync(store.list_versions)
            best = set(await anyio.to_thread.run_sync(store.best_versions, best_rule)) if best_rule else set()
        # keep_best's picks are marked (``list`` shows them): they outlive keep_last.
        rows = [{**i.to_json(), **({"best": best_rule.metric} if i.id in best and best_rule else {})} for i in infos]
        extra: dict[str, Any] = {}
        if self.ctx.replicator is not None:
            # Versions only the bucket has (retired here, or never here: a fresh host) can be restored by id
            # too (op_restore pulls them): list them, marked.
            remote, error = await self.ctx.replicator.bucket_versions(req.owner, store.job)
            local_ids = {i.id for i in infos}
            rows += [{**i.to_json(), "only_in_bucket": True} for i in remote
                     if i.id not in local_ids and i.id < job.next_version]
            rows.sort(key=lambda r: int(r["id"]))
            if error is not None:
                extra["remote_error"] = error
        return Reply({"versions": rows, "dirty": job.dirty, "step": job.step, **extra})

    def _stores(self, req: RpcRequest) -> list[tuple[JobStorage, Job | None]]:
        """The job a maintenance request names, or every job of its owner (all owners for root)."""
        name = req.header.get("job")
        if name is not None:
            store = self.ctx.table.store.job(req.owner, validate_job_name(name))
            if not store.path.exists() and (req.owner, store.job) not in self.ctx.table.jobs:
                raise NotFound(f"no job named {store.job!r}")
            return [(store, self.ctx.table.jobs.get((req.owner, store.job)))]
        stores = self.ctx.table.store.jobs(None if req.owner == 0 else req.owner)
        return [(s, self.ctx.table.jobs.get((s.owner, s.job))) for s in stores]

    async def op_verify(self, req: RpcRequest) -> Reply:
        """Re-hash every retained version (and read every log record) of one job or all of them."""
        reports = []
        for store, _job in await anyio.to_thread.run_sync(lambda: self._stores(req)):
            # No garbage collection of this job while it is read, loaded or not.
            async with self.ctx.table.io_lock((store.owner, store.job)):
                reports.append(await anyio.to_thread.run_sync(store.check))
        return Reply({"jobs": reports})

    async def op_gc(self, req: RpcRequest) -> Reply:
        """Apply retention and collect unreferenced chunks now, for one job or all of them."""
        results = []
        dry_run = req.header.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ProtocolError("dry_run must be true or false")
        for store, job in await anyio.to_thread.run_sync(lambda: self._stores(req)):
            settings = job.settings if job is not None else self.ctx.config().policy
            keep, every, best = settings.keep_last, settings.keep_every, settings.keep_best
            # Never while a save of the job has unreferenced chunks on disk, and no save starts (so none
            # dedups against a chunk being removed) until the collection is over: the lock is per (owner,
            # job), whether or not the job is loaded, and a job loaded meanwhile takes the same lock.
            async with self.ctx.table.io_lock((store.owner, store.job)):
                # Under the lock: a save commits (and the replicator queues its version) inside it too.
                protect = await self._unreplicated(store)
                gc = functools.partial(store.gc, keep, every, protect, dry_run=dry_run, keep_best=best)
                result = await anyio.to_thread.run_sync(gc)
            if dry_run:
                results.append({"job": store.job, "owner": store.owner, "dry_run": True, **result.to_json()})
                continue
            log.info("gc job=%s owner=%d deleted_versions=%s removed_chunks=%d freed_bytes=%d "
                     "kept_unreplicated=%s", store.job, store.owner, result.deleted_versions,
                     result.removed_chunks, result.freed_bytes, result.kept_unreplicated)
            results.append({"job": store.job, "owner": store.owner, **result.to_json()})
        return Reply({"jobs": results})

    async def _unreplicated(self, store: JobStorage) -> set[int]:
        """With ``[remote]``: the job's local versions not yet in the object store (gc keeps them)."""
        if self.ctx.replicator is None:
            return set()
        ids = await anyio.to_thread.run_sync(store.version_ids)
        return self.ctx.replicator.unreplicated(store.owner, store.job, ids)

    def start_delete(self, req: RpcRequest) -> Started:
        """A delete of a job that certainly does not exist is refused here, with no task, lock or thread
        (issue 19: a flood of deletes of random names kept worker threads and the loop busy looking for
        folders); every other delete is :meth:`op_delete`."""
        name = self._job_name(req)
        if (req.header.get("dry_run", False) is False and self.ctx.replicator is None
                and self.ctx.table.surely_absent((req.owner, name))):
            raise NotFound(f"no job named {name!r}")
        return self.op_delete(req)

    async def op_delete(self, req: RpcRequest) -> Reply:
        """Forget a job: its live state and every stored version. A client that sends to it again starts
        a new, empty job of that name."""
        name = self._job_name(req)
        key = (req.owner, name)
        if req.header.get("dry_run", False) is not False:
            return await self._delete_dry_run(req, name)
        # The job's key lock is held until the folder is gone: a request that would load or recreate the
        # job waits for it (and then starts a new, empty job); none is acknowledged for a folder being
        # deleted. The job stays in the table meanwhile, so nothing else loads a second copy.
        async with self.ctx.table.key_lock(key):
            job = self.ctx.table.jobs.get(key)
            if job is not None:
                job.deleted = True  # from now on nothing is acknowledged for it: JobTable.get waits for this lock
            store = job.store if job is not None else self.ctx.table.store.job(req.owner, name)
            replicator = self.ctx.replicator
            if job is None and not await anyio.to_thread.run_sync(store.path.exists) and (
                    replicator is None or not await replicator.in_bucket(req.owner, name)):
                await self.ctx.table.names.of(req.owner)  # once per owner: later ones are refused in start_delete
                raise NotFound(f"no job named {name!r}")
            try:
                if replicator is not None:  # first: from now on nothing re-seeds the job from the bucket
                    await replicator.begin_delete(req.owner, name)
                versions = await self._delete(key, job, store)
            except BaseException:
                if job is not None and key in self.ctx.table.jobs:
                    job.deleted = False  # the folder is still there: the job goes on being served
                    self.ctx.poke(job)  # and saved when due (the scheduler skipped it while deleted)
                if replicator is not None:
                    with anyio.CancelScope(shield=True):
                        await replicator.cancel_delete(req.owner, name,
                                                       await anyio.to_thread.run_sync(store.version_ids))
                raise
            remote = await replicator.finish_delete(req.owner, name) if replicator is not None else None
        log.info("deleted job=%s owner=%d versions=%d reason=request", name, req.owner, len(versions))
        return Reply({"job": name, "owner": req.owner, "deleted_versions": len(versions),
                      **({"remote": remote} if remote is not None else {})})

    async def _delete_dry_run(self, req: RpcRequest, name: str) -> Reply:
        """What ``delete`` would remove (``autosaved delete --dry-run``), removing nothing."""
        if req.header["dry_run"] is not True:
            raise ProtocolError("dry_run must be true or false")
        job = self.ctx.table.jobs.get((req.owner, name))
        store = job.store if job is not None else self.ctx.table.store.job(req.owner, name)
        if job is None and not await anyio.to_thread.run_sync(store.path.exists):
            raise NotFound(f"no job named {name!r}")

        def measure() -> tuple[list[int], int]:
            try:
                return store.version_ids(), store.stored_bytes()
            except FileNotFoundError:  # loaded but never saved: nothing on disk yet
                return [], 0

        versions, stored = await anyio.to_thread.run_sync(measure)
        return Reply({"job": name, "owner": req.owner, "deleted_versions": len(versions), "freed_bytes": stored,
                      "unsaved_bytes": job.dirty_bytes if job is not None else 0, "dry_run": True})

    async def _delete(self, key: tuple[int, str], job: Job | None, store: JobStorage) -> list[int]:
        name = key[1]
        versions = await anyio.to_thread.run_sync(store.version_ids)
        # A save already writing must finish (or fail) before its folder goes away; gc too.
        point("delete", "lock", "before", name)
        async with self.ctx.table.io_lock(key):
            try:
                if job is not None:
                    async with job.wal_lock:
                        job.finish_waiters(NotFound(f"job {name!r} was deleted"))
                        if job.wal is not None:
                            job.wal.close()
                        self.ctx.table.remove(key)
                        await anyio.to_thread.run_sync(store.delete)
                else:
                    await anyio.to_thread.run_sync(store.delete)
            finally:
                # The folder is renamed away first (atomic): once it is gone the job no longer counts for
                # quota.max_jobs, even if sweeping the renamed folder failed.
                with anyio.CancelScope(shield=True):
                    if not await anyio.to_thread.run_sync(store.path.exists):
                        self.ctx.table.folder_gone(*key)
        return versions
