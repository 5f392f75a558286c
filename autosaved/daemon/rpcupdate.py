"""The update handlers: an update checked from its request alone, merged into its job in one event-loop
step, and answered at the level it asked for (accepted, logged, committed, replicated); ``save``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..errors import NotFound, ProtocolError, QuotaExceeded, ShuttingDown, StateLost, StorageError
from ..protocol import ACK_LEVELS, INLINE_LEAF_MAX, blobs_from_frames, inline_allowed
from ..state import Merged, Node, State, changes_anything, merge_counted
from ..tree import Blob, from_node
from .jobs import CommitWaiter, Job, LogWaiter
from .keylocks import Turn
from .offload import off_loop
from .rpcbase import Deferred, HandlerBase, Reply, RpcRequest, Started, _opt_int, check_expiry, finish
from .slottable import SlotConn

MAX_META_BYTES = 64 * 1024
# What closes a request whose reply a log thread already sent (rpcserver: never sent again).
SENT_EARLY = Reply({})


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


def _decode_delta(tree: Any, blobs: list[Blob], inline_max: int) -> State:
    delta = from_node(tree, blobs, allow_delete=True, inline_max=inline_max)
    if not isinstance(delta, dict):
        raise ProtocolError("an update's delta must be a mapping")
    return delta


def _inline_max(header: dict[str, Any]) -> int:
    return INLINE_LEAF_MAX if inline_allowed(header) else 0


@dataclass(frozen=True)
class Planned:
    """A big update's merge, planned in a worker thread against ``root`` (offload.py)."""

    root: Node
    merged: Merged
    changes: bool


def _plan(root: Node, delta: State) -> Planned:
    return Planned(root, merge_counted(root, delta), changes_anything(root, delta))


class UpdateOps(HandlerBase):
    """The ``update`` and ``save`` ops."""

    def _check_bytes_quota(self, job: Job, delta: State, planned: Merged | None = None) -> Merged | None:
        """Refuse an update that would make the owner's states larger than ``quota.max_bytes``; the merge
        it planned (applied as it is when the update goes on). O(the update): the owner's usage is a
        counter (accounting.py) and the merge says what it adds. An update that adds nothing (a delete)
        always goes on, so a user over the limit (lowered by a reload) can make room."""
        limit = self.ctx.config().quota.max_bytes
        if limit is None or job.owner == 0:
            return None
        merged = planned or job.plan(delta)
        used = self.ctx.table.ledger.used(job.owner)
        if merged.cost > 0 and used + merged.cost > limit:
            raise QuotaExceeded(
                f"quota.max_bytes: this update would make the jobs of uid {job.owner} hold {used + merged.cost} "
                f"bytes of state (the limit is {limit}; every leaf, key and container counts its encoded size); "
                "the update was not applied",
                details={"quota": "max_bytes", "limit": limit, "used": used, "update": merged.cost},
            )
        return merged

    def _parse_update(self, req: RpcRequest) -> ParsedUpdate:
        """Everything an update says that can be checked from the request alone (no job, no await)."""
        u, blobs = self._parse_fields(req)
        u.delta = _decode_delta(req.header.get("tree"), blobs, _inline_max(req.header))
        self._check_running()
        return u

    def _check_running(self) -> None:
        if self.ctx.shutting_down():
            raise ShuttingDown("the daemon is shutting down and saving; this update was not applied")

    def _parse_fields(self, req: RpcRequest) -> tuple[ParsedUpdate, list[Blob]]:
        """:meth:`_parse_update` but the delta's decode (left empty): the fields and the blobs it carries."""
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
        # The delta's blobs are exactly ``blobs``: its size needs no second walk of the tree.
        size = req.header_size + sum(b.nbytes for b in blobs)
        return ParsedUpdate(name=name, session=session, wait=wait, step=step, meta=meta, acked=acked, conn=conn,
                            delta={}, size=size), blobs

    def start_update(self, req: RpcRequest) -> Started:
        """An update of a loaded job is applied right here, in the rpc loop's step (so updates apply in the
        order they arrived); ``accepted`` is answered at once, the other levels return what waits for them.
        A job not loaded yet (or being deleted) takes the slow path, which may read the disk."""
        u = self._parse_update(req)
        key = (req.owner, u.name)
        job = self.ctx.table.jobs.get(key)
        if (job is None or job.deleted or not job.resident or job.queued_updates
                or self.ctx.table.update_turns.busy(key)):
            # Not loaded, evicted, or earlier updates wait for its (re)load: its place behind them is taken
            # now, at arrival (a task's first step may come after a later update's fast path).
            return self._update_in_turn(req, u, self.ctx.table.update_turns.take(key))
        self.ctx.table.cache.hit(job)
        return self._apply_update(req, u, job)

    async def op_update_big(self, req: RpcRequest) -> Reply:
        """An update whose header is big (offload.py): decoded and its merge planned in a worker thread,
        merged here on the event loop. The rpc server starts none of the sender's other requests until
        ``req.on_applied`` (their order is kept)."""
        try:
            u, blobs = self._parse_fields(req)
            inline_max = _inline_max(req.header)
            u.delta = await off_loop(_decode_delta, req.header.pop("tree", None), blobs, inline_max, owner=req.owner)
            self._check_running()
            key = (req.owner, u.name)
            turns = self.ctx.table.update_turns
            job = self.ctx.table.jobs.get(key)
            if job is None or job.deleted or turns.busy(key):
                # Behind the updates waiting for the job's load (the sender's later ones wait for this one).
                turn = turns.take(key)
                try:
                    await turn.wait()
                    async with self._job_quota(req.owner, u.name):
                        job = await self.ctx.table.get(req.owner, u.name)
                    started = await self._apply_planned(req, u, job)
                finally:
                    turns.done(key, turn)
            else:
                started = await self._apply_planned(req, u, job)
        finally:
            if req.on_applied is not None:
                req.on_applied()
        return await finish(started)

    async def _apply_planned(self, req: RpcRequest, u: ParsedUpdate, job: Job) -> Started:
        """Merge a big update planned off the loop: under the job's reload lock, as an update of an evicted
        job (updates that come meanwhile queue behind it; the tree stays resident while pinned)."""
        table = self.ctx.table
        job.queued_updates += 1
        job.pins += 1
        try:
            async with job.reload_lock:
                if job.deleted or table.jobs.get(job.key) is not job:
                    return await self._load_and_apply(req, u)  # deleted meanwhile: a new job of that name
                await table.make_resident(job)
                root = job.root
                planned: Planned | None = await off_loop(_plan, root, u.delta, owner=req.owner)
                if planned is not None and job.root is not planned.root:
                    planned = None  # the job changed meanwhile: planned again on the loop
                try:
                    return self._apply_update(req, u, job, planned)
                except BaseException:
                    table.forget_if_unused(job)
                    raise
        finally:
            job.queued_updates -= 1
            job.pins -= 1

    async def _update_in_turn(self, req: RpcRequest, u: ParsedUpdate, turn: Turn) -> Reply:
        """An update of a job not loaded yet or evicted (or of one whose earlier updates still wait for its
        load): loaded and applied in its turn, so updates apply in the order they arrived (the fast path is
        closed to the key until the last turn is done); its ack waits outside the turn."""
        turns = self.ctx.table.update_turns
        key = (req.owner, u.name)
        try:
            await turn.wait()
            started = await self._load_and_apply(req, u)
        finally:
            turns.done(key, turn)
        return await finish(started)

    async def _load_and_apply(self, req: RpcRequest, u: ParsedUpdate) -> Started:
        async with self._job_quota(req.owner, u.name):
            job = await self.ctx.table.get(req.owner, u.name)
        if not job.resident or job.queued_updates:
            return await self._reload_and_apply(req, u, job)
        try:
            return self._apply_update(req, u, job)
        except BaseException:
            self.ctx.table.forget_if_unused(job)  # a refused first update leaves no empty job behind
            raise

    async def _reload_and_apply(self, req: RpcRequest, u: ParsedUpdate, job: Job) -> Started:
        """An update of a job whose tree the state cache evicted: loaded back first. Updates queue on the
        job's reload lock (first come, first served) and apply under it, so they keep their order."""
        table = self.ctx.table
        job.queued_updates += 1
        job.pins += 1
        try:
            async with job.reload_lock:
                gone = job.deleted or table.jobs.get(job.key) is not job
                if not gone:
                    await table.make_resident(job)
                    started = self._apply_update(req, u, job)
        finally:
            job.queued_updates -= 1
            job.pins -= 1
        if gone:  # deleted meanwhile: a new job of that name
            return await self._load_and_apply(req, u)
        return started

    def _apply_update(self, req: RpcRequest, u: ParsedUpdate, job: Job, planned: Planned | None = None) -> Started:
        """Check the update against its job and merge it, in one event-loop step (atomic); the ack for
        ``accepted``, or the coroutine that waits for the level asked for."""
        h = req.header
        check_expiry(req, time.time())  # a load or a decode may have awaited: never applied after its deadline
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
        merged = self._check_bytes_quota(job, u.delta, planned.merged if planned else None)
        if merged is None and planned is not None:
            merged = planned.merged
        generation = job.apply(u.delta, session=u.session, seq=req.seq, step=u.step, meta=u.meta, size=u.size,
                               now=self.ctx.clock(), merged=merged,
                               changes=planned.changes if planned is not None else None)
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
        if deferred.sent_early:
            deferred.resolve(SENT_EARLY)  # the log thread sent the reply: this only closes the request
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
