"""RpcRequest handlers: one per op (a ``start_*`` that may answer inline, or an ``async op_*``), each
turning a validated request into a reply; :data:`REGISTRY` binds them to :data:`autosaved.protocol.OP_TABLE`.

Handlers raise :class:`~autosaved.errors.AutosavedError` for anything the client did wrong or the daemon
could not do; the server turns that into an error reply. Nothing a client sends can make a handler
write outside its own job's folder: the job name is validated before any path is built from it.

What each op costs (issue 19: O(the request, or the caller's own jobs), never a walk of what other users
hold; counters and per-owner indexes instead, see accounting.py, jobcount.py and ``JobTable.by_owner``):

- ``ping``: O(1).
- ``hello``, and ``update`` / ``save`` of a job not loaded yet: the job's load (its log replay: O(the job));
  ``quota.max_jobs``: O(1) from the owner's job names (one listing of the owner's own folder per daemon run).
- ``update``: O(the delta) to check and merge (``quota.max_bytes`` from the owner's counter) plus O(the
  client's slots) for ``held``. ``logged`` adds the log append; ``committed``/``replicated`` the job's save.
- ``save``: the job's save; the scheduler decides for that job alone, when asked and when its save ends
  (wakeups.py: jobs asked for plus a heap of per-job wake-ups; only a reload decides for every job).
- ``restore``: O(what it sends) (a version read from disk: that version's manifest and chunks).
- ``status`` of one job: O(1); of all: O(the caller's jobs) via the per-owner index, plus counters
  (state bytes, slot totals); root (and the daemon's own user) get every job.
- ``list`` of one job: O(its versions); of all: O(the caller's jobs and their stored chunk files) (it sums
  each job's chunk sizes); root lists every user's.
- ``verify`` / ``gc``: O(the job's, or the caller's jobs', stored data), in worker threads.
- ``delete``: O(the job's files), plus one listing of the owner's folder to sweep half-deleted jobs.
- The fd socket (fdserver.py): a slot's ``add``/``drop`` is O(1) (the per-user mapped bytes are counters,
  slottable.py), a connection's end O(its slots); a restore through it O(what it sends).
- ``/metrics`` (not an rpc) renders every loaded job, from counters; systemd's STATUS= line, every few
  seconds, also visits every loaded job.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.to_thread
import msgpack

from ..config import PolicySettings
from ..errors import Forbidden, NotFound, ProtocolError, QuotaExceeded, ShuttingDown, StateLost, StorageError
from ..names import validate_job_name
from ..protocol import ACK_LEVELS, OP_TABLE, OPS, Access, OpSpec, blob_descriptors, blobs_from_frames, validate_path
from ..shm import layout, release_mapping
from ..state import Merged, State
from ..storage.base import JobStorage
from ..storage.faults import point
from ..storage.fsutil import pwrite_all
from ..tree import Blob, from_node, to_node
from .jobs import CommitWaiter, Job, LogWaiter
from .slottable import SlotConn

if TYPE_CHECKING:
    from ..config import Config
    from .jobtable import JobTable
    from .replicator import Replicator
    from .slottable import SlotTable
    from .walcommit import LogCommitter

log = logging.getLogger("autosaved.rpc")
MAX_META_BYTES = 64 * 1024
MAX_PATHS = 4096


@dataclass
class RpcRequest:
    """One request as the daemon received it (the client's own ``Request`` is what it sends)."""

    op: str
    seq: int
    header: dict[str, Any]
    frames: Sequence[memoryview]
    owner: int
    header_size: int


@dataclass
class ParsedUpdate:
    """An update as checked from its request alone, before it meets its job."""

    name: str
    session: str
    wait: str
    step: int | None
    meta: dict[str, Any] | None
    acked: int
    conn: SlotConn | None
    delta: State
    size: int  # what it adds to the job's unsaved bytes


@dataclass
class Reply:
    fields: dict[str, Any]
    frames: Sequence[memoryview | bytes] = ()


class Deferred:
    """A reply that something else completes later (a log sync), by calling :meth:`resolve` once: the rpc
    loop is called back, and no task sits waiting for it (perf, issue 14: for a ``logged`` update that
    task and its wake-up cost as much as the handling)."""

    def __init__(self) -> None:
        self._callbacks: list[Callable[[Reply | Exception], None]] = []
        self._result: Reply | Exception | None = None
        # Set by the rpc loop: sends a reply from another thread ahead of :meth:`resolve` (True: sent).
        self.early: Callable[[Reply], bool] | None = None
        self.sent_early = False

    def send_early(self, reply: Reply) -> None:
        """From a log thread, before :meth:`resolve`: send ``reply`` now if the rpc loop allows it; the
        later :meth:`resolve` then only closes the request."""
        if self.early is not None and self.early(reply):
            self.sent_early = True

    def on_done(self, callback: Callable[[Reply | Exception], None]) -> None:
        if self._result is not None:
            callback(self._result)
        else:
            self._callbacks.append(callback)

    def resolve(self, result: Reply | Exception) -> None:
        assert self._result is None, "a request is answered once"
        self._result = result
        for callback in self._callbacks:
            callback(result)
        self._callbacks.clear()

    async def result(self) -> Reply:
        """Wait for the reply (an error raises): for callers that are tasks anyway."""
        done = anyio.Event()
        self.on_done(lambda _: done.set())
        await done.wait()
        assert self._result is not None
        if isinstance(self._result, Exception):
            raise self._result
        return self._result


# What starting a request gives: its reply now, one to come (Deferred), or the coroutine that finishes it.
Started = Reply | Deferred | Coroutine[Any, Any, Reply]


async def finish(started: Started) -> Reply:
    """Wait for the reply of a started request."""
    if isinstance(started, Reply):
        return started
    if isinstance(started, Deferred):
        return await started.result()
    return await started


def _opt_int(header: dict[str, Any], key: str) -> int | None:
    value = header.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ProtocolError(f"{key} must be an integer")
    return value


def _meta(header: dict[str, Any]) -> dict[str, Any] | None:
    meta = header.get("meta")
    if meta is None:
        return None
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise ProtocolError("meta must be a map with string keys")
    try:
        # Exactly how the manifest will serialise it (storage/manifest.py): a value that passed here can
        # never fail the save later, where it would be the job's error, replayed from the log at every start.
        encoded = json.dumps(meta, sort_keys=True, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"meta must be JSON-like, with keys of one type per map: {exc}") from None
    except RecursionError:
        raise ProtocolError("meta is nested too deeply") from None
    if len(encoded) > MAX_META_BYTES:
        raise ProtocolError(f"meta is {len(encoded)} bytes; the limit is {MAX_META_BYTES}")
    # What the manifest will hold (int keys become strings): the live state and the log then agree with it.
    normal: dict[str, Any] = json.loads(encoded)
    return normal


def _paths(raw: Any) -> list[tuple[str | int, ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_PATHS:
        raise ProtocolError(f"paths must be a list of at most {MAX_PATHS} paths")
    return [validate_path(p) for p in raw]


def _subtree(tree: Any, path: tuple[str | int, ...]) -> Any:
    """The node at ``path`` under ``tree``; ``None`` when a key is missing or a step is not a mapping."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


@dataclass(frozen=True)
class RpcContext:
    """What the handlers may see of the daemon (uvicorn's ``ServerState`` idea): the job table, the stores
    and slots, the live config through a getter, and a few callables. Never the daemon itself."""

    config: Callable[[], Config]
    table: JobTable
    slots: SlotTable
    wal: LogCommitter  # the write-ahead log's group committer
    replicator: Replicator | None
    clock: Callable[[], float]
    poke: Callable[[Job], None]  # the scheduler decides for this job at its next pass
    # After an update of this job: wake the scheduler only if the job may be due sooner (perf, issue 14).
    poke_for: Callable[[Job], None]
    shutting_down: Callable[[], bool]
    # Someone waits for this job's next commit: its background saves in flight run unthrottled.
    promote: Callable[[Job], None]
    boot: str
    pid: int
    uid: int
    status: Callable[[int | None], dict[str, Any]]
    list_jobs: Callable[[int | None], list[dict[str, Any]]]
    # Charge the bytes a reply is about to be built of to its user (quota.max_reply_bytes), or refuse.
    reply_reserve: Callable[[int, int], AbstractContextManager[None]] = lambda _uid, _size: nullcontext()


class Handlers:
    def __init__(self, ctx: RpcContext) -> None:
        self.ctx = ctx

    def start(self, req: RpcRequest) -> Started:
        """Begin a request (``check_request`` already refused unknown ops): its reply when it can be
        answered without waiting for anything, else the coroutine that finishes it. The rpc loop answers
        the first kind inline and gives only the second a task of its own (perf, issue 14: a task per
        request cost more than a small update's whole handling)."""
        op = REGISTRY.get(req.op)
        if op is None:
            raise ProtocolError(f"unknown op {req.op!r}", details={"code": "unknown_op"})
        if op.spec.access is Access.JOB_OWNER:
            req.owner = self._effective_owner(req)
        return op.handler(self, req)

    @staticmethod
    def _effective_owner(req: RpcRequest) -> int:
        """Whose jobs a request acts on: the peer's own, or, for root only, the uid in ``owner``."""
        asked = req.header.get("owner")
        if asked is None or asked == req.owner:
            return req.owner
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 0:
            raise ProtocolError("owner must be a uid (a non-negative integer)")
        if req.owner != 0:
            raise Forbidden(f"uid {req.owner} may not act on jobs of uid {asked}; only root may")
        return asked

    async def _check_job_quota(self, owner: int, name: str) -> None:
        """Refuse to create a job beyond ``quota.max_jobs`` (root is exempt). A job counts when its folder
        is on disk or it is loaded. O(1): the table keeps each owner's names (jobcount.py; an owner's
        folder is listed once per daemon run, at the first check that needs it)."""
        limit = self.ctx.config().quota.max_jobs
        if limit is None or owner == 0 or (owner, name) in self.ctx.table.jobs:
            return
        names = await self.ctx.table.names.of(owner)
        if name not in names and len(names) >= limit:
            raise QuotaExceeded(
                f"quota.max_jobs: uid {owner} already has {len(names)} jobs (the limit is {limit}); delete one "
                "with `autosaved delete JOB` or ask the administrator to raise the quota",
                details={"quota": "max_jobs", "limit": limit, "used": len(names)},
            )

    def _check_bytes_quota(self, job: Job, delta: State) -> Merged | None:
        """Refuse an update that would make the owner's states larger than ``quota.max_bytes``; the merge
        it planned (applied as it is when the update goes on). O(the update): the owner's usage is a
        counter (accounting.py) and the merge says what it adds. An update that adds nothing (a delete)
        always goes on, so a user over the limit (lowered by a reload) can make room."""
        limit = self.ctx.config().quota.max_bytes
        if limit is None or job.owner == 0:
            return None
        merged = job.plan(delta)
        used = self.ctx.table.ledger.used(job.owner)
        if merged.cost > 0 and used + merged.cost > limit:
            raise QuotaExceeded(
                f"quota.max_bytes: this update would make the jobs of uid {job.owner} hold {used + merged.cost} "
                f"bytes of state (the limit is {limit}; every leaf, key and container counts its encoded size); "
                "the update was not applied",
                details={"quota": "max_bytes", "limit": limit, "used": used, "update": merged.cost},
            )
        return merged

    def _job_name(self, req: RpcRequest) -> str:
        return validate_job_name(req.header.get("job"))

    def start_ping(self, req: RpcRequest) -> Reply:
        return Reply({"pid": self.ctx.pid})

    def start_hello(self, req: RpcRequest) -> Started:
        name = self._job_name(req)
        job = self.ctx.table.jobs.get((req.owner, name))
        if job is None or job.deleted:
            return self.op_hello(req)
        return self._hello(req, job)

    async def op_hello(self, req: RpcRequest) -> Reply:
        name = self._job_name(req)
        await self._check_job_quota(req.owner, name)
        job = await self.ctx.table.find(req.owner, name)
        if job is None:
            # A job exists from its first accepted update, not from a hello (issue 22: a typo made jobs);
            # the client sends its policy with every update, so nothing is lost by not keeping it here.
            return Reply({"durable": 0, "latest_version": None, "policy": self._requested_policy(req).to_wire()})
        return self._hello(req, job)

    def _requested_policy(self, req: RpcRequest) -> PolicySettings:
        """The policy a job not created yet would run under: the defaults with the request's overrides."""
        raw = req.header.get("policy")
        if raw is not None and not isinstance(raw, dict):
            raise ProtocolError("policy must be a map")
        return PolicySettings.parse(raw or {}, base=self.ctx.config().policy, where="policy")

    def _hello(self, req: RpcRequest, job: Job) -> Reply:
        self._apply_policy(job, req.header.get("policy"))
        session = req.header.get("session")
        durable = job.durable.get(session, 0) if isinstance(session, str) else 0
        return Reply({"durable": durable, "latest_version": job.latest_version, "policy": job.settings.to_wire()})

    def _apply_policy(self, job: Job, raw: Any) -> None:
        if raw is None:
            return
        if not isinstance(raw, dict):
            raise ProtocolError("policy must be a map")
        settings = PolicySettings.parse(raw, base=self.ctx.config().policy, where="policy")
        job.policy_overrides = dict(raw)
        if settings != job.settings:
            job.settings = settings
            self.ctx.poke(job)

    def _parse_update(self, req: RpcRequest) -> ParsedUpdate:
        """Everything an update says that can be checked from the request alone (no job, no await)."""
        h = req.header
        name = self._job_name(req)
        session = h.get("session")
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            raise ProtocolError("update needs a session id (a string of at most 64 characters)")
        wait = h.get("wait", "accepted")
        if wait not in ACK_LEVELS:
            raise ProtocolError(f"wait must be one of {', '.join(ACK_LEVELS)}, not {wait!r}")
        if wait == "replicated" and self.ctx.replicator is None:
            raise ProtocolError("wait='replicated' needs a [remote] object store in the daemon's config")
        step = _opt_int(h, "step")
        meta = _meta(h)
        acked = _opt_int(h, "acked") or 0
        conn: SlotConn | None = None
        placed: dict[int, memoryview] = {}
        if h.get("shm") is not None:
            descs = h.get("blobs")
            try:
                conn, placed = self.ctx.slots.views(req.owner, h["shm"], len(descs) if isinstance(descs, list) else 0)
            except LookupError as exc:
                raise ProtocolError(str(exc), details={"code": "slot_unknown"}) from None
            except ValueError as exc:
                raise ProtocolError(f"shm: {exc}") from None
        blobs = blobs_from_frames(h.get("blobs"), req.frames, placed)
        delta = from_node(h.get("tree"), blobs, allow_delete=True)
        if not isinstance(delta, dict):
            raise ProtocolError("an update's delta must be a mapping")
        if self.ctx.shutting_down():
            raise ShuttingDown("the daemon is shutting down and saving; this update was not applied")
        # The delta's blobs are exactly ``blobs``: its size needs no second walk of the tree.
        size = req.header_size + sum(b.nbytes for b in blobs)
        return ParsedUpdate(name=name, session=session, wait=wait, step=step, meta=meta, acked=acked, conn=conn,
                            delta=delta, size=size)

    def start_update(self, req: RpcRequest) -> Started:
        """An update of a loaded job is applied right here, in the rpc loop's step (so updates apply in the
        order they arrived); ``accepted`` is answered at once, the other levels return what waits for them.
        A job not loaded yet (or being deleted) takes the slow path, which may read the disk."""
        u = self._parse_update(req)
        job = self.ctx.table.jobs.get((req.owner, u.name))
        if job is None or job.deleted:
            return self._update_loading(req, u)
        return self._apply_update(req, u, job)

    async def _update_loading(self, req: RpcRequest, u: ParsedUpdate) -> Reply:
        await self._check_job_quota(req.owner, u.name)
        job = await self.ctx.table.get(req.owner, u.name)
        try:
            started = self._apply_update(req, u, job)
        except BaseException:
            self.ctx.table.forget_if_unused(job)  # a refused first update leaves no empty job behind
            raise
        return await finish(started)

    def _apply_update(self, req: RpcRequest, u: ParsedUpdate, job: Job) -> Started:
        """Check the update against its job and merge it, in one event-loop step (atomic); the ack for
        ``accepted``, or the coroutine that waits for the level asked for."""
        h = req.header
        client_boot = h.get("boot")
        if client_boot is not None and client_boot != self.ctx.boot and u.acked > job.durable.get(u.session, 0):
            raise StateLost(
                f"the daemon restarted and lost updates of job {u.name!r} it had acknowledged (up to seq "
                f"{u.acked}; the newest saved one is seq {job.durable.get(u.session, 0)}); send the full state again",
                details={"acked_seq": u.acked, "durable_seq": job.durable.get(u.session, 0)},
            )
        self._apply_policy(job, h.get("policy"))
        if self.ctx.shutting_down():  # re-check: loading the job may have awaited
            raise ShuttingDown("the daemon is shutting down and saving; this update was not applied")
        if u.wait == "logged" and job.wal_broken:
            raise StorageError(
                f"the write-ahead log of {u.name!r} is unavailable after an I/O error ({job.wal_broken}); a snapshot "
                "is being saved. This update was not applied; retry, or use wait='committed'."
            )
        merged = self._check_bytes_quota(job, u.delta)
        generation = job.apply(u.delta, session=u.session, seq=req.seq, step=u.step, meta=u.meta, size=u.size,
                               now=self.ctx.clock(), merged=merged)
        if u.wait == "accepted":
            self.ctx.poke_for(job)
            return Reply({"ack": "accepted", "durable": job.durable.get(u.session, 0), "generation": generation,
                          **self._held(u.conn)})
        if u.wait == "logged":
            deferred = Deferred()
            waiter = LogWaiter(job.take_log_record(), hold=job.take_log_hold())
            waiter.notify = lambda: self._logged(job, u, waiter, deferred)
            if u.conn is None:  # no slots to report as held: the log thread may answer right after the sync
                waiter.early = lambda durable: deferred.send_early(Reply(
                    {"ack": "logged", "durable": durable(u.session), "lsn": waiter.record.lsn}))
            # Queued in the same event-loop step as the apply: records reach the log in lsn order.
            self.ctx.wal.enqueue(job, waiter)
            self.ctx.poke_for(job)
            return deferred
        return self._wait_saved(job, u, generation)

    def _logged(self, job: Job, u: ParsedUpdate, waiter: LogWaiter, deferred: Deferred) -> None:
        """The record's batch was synced (or failed): answer the update."""
        if waiter.error is not None:
            deferred.resolve(waiter.error)
            return
        try:
            reply = Reply({"ack": "logged", "durable": job.durable.get(u.session, 0), "lsn": waiter.record.lsn,
                           **self._held(u.conn)})
        except Exception as exc:
            deferred.resolve(exc)
            return
        deferred.resolve(reply)

    async def _wait_saved(self, job: Job, u: ParsedUpdate, generation: int) -> Reply:
        version = await self._wait_committed(job, generation)
        if u.wait == "replicated" and self.ctx.replicator is not None and version is not None:
            # Never acked while the store is unreachable: the client's save_timeout bounds the wait.
            version = await self.ctx.replicator.wait_replicated(job.key, version)
            return Reply({"ack": "replicated", "durable": job.durable.get(u.session, 0), "version": version,
                          **self._held(u.conn)})
        return Reply({"ack": "committed", "durable": job.durable.get(u.session, 0), "version": version,
                      **self._held(u.conn)})

    def _held(self, conn: SlotConn | None) -> dict[str, Any]:
        """Which of the client's slots the daemon still references: the client must not write into those."""
        if conn is None:
            return {}
        return {"held": self.ctx.slots.held_of(conn, self.ctx.table.ledger.refs)}

    async def _wait_committed(self, job: Job, generation: int) -> int | None:
        if generation <= job.saved_generation and job.latest_version is not None:
            return job.latest_version  # a committed version covers it already (an update that changed nothing)
        waiter = CommitWaiter(generation)
        job.waiters.append(waiter)
        job.explicit_requested = True
        self.ctx.promote(job)
        self.ctx.poke(job)
        await waiter.done.wait()
        if waiter.error is not None:
            raise waiter.error
        return waiter.version

    async def op_save(self, req: RpcRequest) -> Reply:
        name = self._job_name(req)
        if self.ctx.shutting_down():
            raise ShuttingDown("the daemon is shutting down; every dirty job is being saved already")
        job = await self.ctx.table.find(req.owner, name)
        if job is None:
            raise NotFound(f"no job named {name!r}: a job exists from its first update")
        if not job.dirty and not job.saving and job.latest_version is not None:
            return Reply({"version": job.latest_version, "new": False})
        if job.latest_version is None and not job.dirty:
            job.generation += 1  # an explicit save of a job with no version commits its (empty) state
        version = await self._wait_committed(job, job.generation)
        return Reply({"version": version, "new": True})

    async def op_restore(self, req: RpcRequest) -> Reply:
        name = self._job_name(req)
        version = _opt_int(req.header, "version")
        paths = _paths(req.header.get("paths"))
        # Loaded (log replayed) if it exists: a restore after a restart sees every ``logged`` update.
        table = self.ctx.table
        job = await table.find(req.owner, name) if version is None else table.jobs.get((req.owner, name))
        store = job.store if job else self.ctx.table.store.job(req.owner, name)
        if version is not None and self.ctx.replicator is not None:
            job = await self._pull(req.owner, name, version) or job
        # The job's io lock from taking the tree until its leaves are read: a leaf of a loaded state (or of
        # a stored version) is read from chunk files, and a save's retention and gc (or `autosaved gc`),
        # which hold this lock, could otherwise delete them meanwhile, once a newer update replaced the
        # leaf (the soak's "restore raised CorruptVersion(... (live state): chunk ... is missing)").
        async with self.ctx.table.io_lock((req.owner, name)):
            return await self._restore_locked(req, name, version, paths, job, store)

    async def _restore_locked(self, req: RpcRequest, name: str, version: int | None, paths: Any,
                              job: Job | None, store: JobStorage) -> Reply:
        if version is None and job is not None and (job.dirty or job.latest_version is not None or job.root):
            tree: State | None = job.root
            info: dict[str, Any] = {"version": job.latest_version, "step": job.step, "live": True}
        else:
            if version is None:
                # With a path only the subtree's leaves are read, in _send_tree.
                loaded = await anyio.to_thread.run_sync(lambda: store.load_newest(load_data=paths is None))
            else:
                # Chunks are read (and verified) once, straight into what is sent: no staging copy.
                loaded = await anyio.to_thread.run_sync(lambda: store.load(version, load_data=False, verify=False))
            if loaded is None:
                return Reply({"tree": None, "blobs": [], "version": None})
            tree = loaded.tree
            info = {"version": loaded.info.id, "step": loaded.info.step, "live": False}
        sent: Any = tree if paths is None else [_subtree(tree, p) for p in paths]
        # A live state's slots stay lent until the bytes are copied out (a stored one reads no slot).
        hold = self.ctx.table.ledger.hold_tree(sent) if info["live"] else None
        try:
            return await self._send_tree(req, store, sent, info)
        finally:
            if hold is not None:
                hold.release()

    async def _pull(self, owner: int, name: str, version: int) -> Job | None:
        """A restore by id of a version this host lacks, with ``[remote]``: copy it here from the bucket
        first. The job is loaded first (on a fresh host that seeds its newest version), and only ids below
        its next one are pulled: a bucket version this host would number itself is not its own."""
        assert self.ctx.replicator is not None
        store = self.ctx.table.store.job(owner, name)
        if version in await anyio.to_thread.run_sync(store.version_ids):
            return None
        job = await self.ctx.table.find(owner, name)
        if job is None or version >= job.next_version:
            return job
        async with job.io_lock:  # no save or gc of the job while a version is written into its store
            if version not in await anyio.to_thread.run_sync(store.version_ids):
                await self.ctx.replicator.pull(owner, name, version, self.ctx.replicator.local_store(owner, name))
        return job

    async def _send_tree(self, req: RpcRequest, store: JobStorage, tree: Any, info: dict[str, Any]) -> Reply:
        node, blobs = to_node(tree)
        # What the reply may make the daemon hold (read buffers, a memfd) is charged before it is read.
        with self.ctx.reply_reserve(req.owner, sum(b.nbytes for b in blobs)):
            return await self._build_tree_reply(req, store, node, blobs, info)

    async def _build_tree_reply(self, req: RpcRequest, store: JobStorage, node: Any, blobs: list[Blob],
                                info: dict[str, Any]) -> Reply:
        shm = await self._restore_through_memfd(req, store, blobs)
        placed = {i for i, _ in shm["refs"]} if shm else set()
        live = self.ctx.slots.live_mappings()

        def read(blob: Blob) -> memoryview:
            # A live client may write into its slot once the daemon lets go of it, which could happen
            # before ZeroMQ has sent this reply: copy those bytes. Slots of gone clients are never reused.
            if blob.data is not None and id(blob.data.obj) in live:
                return memoryview(bytes(blob.data))
            return store.read_blob(blob)

        frames = await anyio.to_thread.run_sync(lambda: [read(b) for i, b in enumerate(blobs) if i not in placed])
        return Reply({"tree": node, "blobs": blob_descriptors(blobs), **info, **({"shm": shm} if shm else {})},
                     frames)

    async def _restore_through_memfd(self, req: RpcRequest, store: JobStorage,
                                     blobs: list[Blob]) -> dict[str, Any] | None:
        """Put the bulk leaves of a restore into a fresh memfd and hand it to the client's fd connection:
        the client maps it and builds arrays over it, with no copy of its own. ``None``: send inline."""
        token = req.header.get("shm_conn")
        conn = self.ctx.slots.conns.get(token) if isinstance(token, str) else None
        if conn is None or conn.uid != req.owner or conn.send_fds is None:
            return None
        refs, total = layout(blobs)
        if not refs:
            return None

        def fill() -> int:
            # Stored leaves go file → memfd in the kernel (sendfile), live ones with pwrite. The memfd is
            # not preallocated and only ever written through syscalls: no memory gives ENOSPC, never SIGBUS.
            fd = os.memfd_create("autosaved-restore", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, total)
                mapping = mmap.mmap(fd, total, flags=mmap.MAP_SHARED)
                for i, off in refs:
                    data = blobs[i].data
                    if data is None:
                        store.send_blob(blobs[i], fd, off, mapping)
                    else:
                        pwrite_all(fd, data, off)
                release_mapping(mapping)
            except BaseException:
                os.close(fd)
                raise
            return fd

        try:
            fd = await anyio.to_thread.run_sync(fill)
        except OSError as exc:  # no memory for the buffer: the frames still work
            log.warning("restore of %s through shared memory failed (%s); sending inline", store.job, exc)
            return None
        try:
            await conn.send_fds(msgpack.packb({"seq": req.seq}), [fd])
        finally:
            os.close(fd)
        return {"seq": req.seq, "size": total, "refs": [list(r) for r in refs]}

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


# -- the request registry ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One op's handler, beside its wire facts (``spec``: who may call it, whether it is long), which
    :data:`autosaved.protocol.OP_TABLE` declares for the client and the daemon both."""

    spec: OpSpec
    # Starts the request: its reply when it can answer without awaiting (``start_*``: ping, hello and
    # updates of a loaded job), else the coroutine that finishes it (every ``async def op_*``).
    handler: Callable[[Handlers, RpcRequest], Started]


def _registry(handlers: Mapping[str, Callable[[Handlers, RpcRequest], Started]]) -> Mapping[str, Op]:
    if set(handlers) != OPS:
        # protocol.OP_TABLE is the wire's list (check_request refuses others): it and the handlers cannot drift.
        raise RuntimeError(f"the request registry {sorted(handlers)} does not match protocol.OPS {sorted(OPS)}")
    return {name: Op(OP_TABLE[name], handler) for name, handler in handlers.items()}


REGISTRY: Final = _registry({
    "ping": Handlers.start_ping,
    "hello": Handlers.start_hello,
    "update": Handlers.start_update,
    "save": Handlers.op_save,
    "restore": Handlers.op_restore,
    "status": Handlers.op_status,
    "list": Handlers.op_list,
    "verify": Handlers.op_verify,
    "gc": Handlers.op_gc,
    "delete": Handlers.op_delete,
})
