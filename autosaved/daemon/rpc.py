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

The handlers are split by concern: :mod:`.rpcupdate` (updates, save), :mod:`.rpcrestore`,
:mod:`.rpcadmin` (status, list, verify, gc, delete), over :mod:`.rpcbase` (requests, replies, the
context); here are the session ops (ping, hello) and the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

from ..errors import ProtocolError
from ..protocol import OP_TABLE, OPS, Access, OpSpec
from .jobs import Job
from .rpcadmin import AdminOps
from .rpcbase import Deferred, Reply, RpcContext, RpcRequest, Started, finish
from .rpcrestore import RestoreOps
from .rpcupdate import ParsedUpdate, UpdateOps

__all__ = ["REGISTRY", "Deferred", "Handlers", "Op", "ParsedUpdate", "Reply",
           "RpcContext", "RpcRequest", "Started", "finish"]


class Handlers(UpdateOps, RestoreOps, AdminOps):
    """Every op's handler: the session ops (ping, hello) here, the others from their concern's class."""

    def start(self, req: RpcRequest) -> Started:
        """Begin a request (``check_request`` already refused unknown ops): its reply when it can be
        answered without waiting for anything, else the coroutine that finishes it. The rpc loop answers
        the first kind inline and gives only the second a task of its own (perf, issue 14: a task per
        request cost more than a small update's whole handling)."""
        self.ctx.wal.settle()  # the bookkeeping of log batches synced since: every request sees it done
        op = REGISTRY.get(req.op)
        if op is None:
            raise ProtocolError(f"unknown op {req.op!r}", details={"code": "unknown_op"})
        if op.spec.access is Access.JOB_OWNER:
            req.owner = self._effective_owner(req)
        if req.op == "update" and req.on_applied is not None:
            return self.op_update_big(req)  # a big header (offload.py): decoded off the event loop
        return op.handler(self, req)

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
        async with self._job_quota(req.owner, name):
            job = await self.ctx.table.find(req.owner, name)
        if job is None:
            # A job exists from its first accepted update, not from a hello (issue 22: a typo made jobs);
            # the client sends its policy with every update, so nothing is lost by not keeping it here.
            return Reply({"durable": 0, "latest_version": None, "policy": self._requested_policy(req).to_wire()})
        return self._hello(req, job)

    def _hello(self, req: RpcRequest, job: Job) -> Reply:
        self._apply_policy(job, req.header.get("policy"))
        session = req.header.get("session")
        durable = job.durable.get(session, 0) if isinstance(session, str) else 0
        return Reply({"durable": durable, "latest_version": job.latest_version, "policy": job.settings.to_wire()})


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
    "delete": Handlers.start_delete,
})
