"""The request side of the rpc handlers: a request as the daemon received it, its reply (now, deferred, or
a coroutine's), the handlers' narrow context, and :class:`HandlerBase`, what every concern's handlers
share (whose jobs a request acts on, the job quota, a client's policy overrides).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from ..config import PolicySettings
from ..errors import Expired, Forbidden, ProtocolError, QuotaExceeded
from ..names import validate_job_name
from .jobs import Job

if TYPE_CHECKING:
    from ..config import Config
    from .jobtable import JobTable
    from .replicator import Replicator
    from .slottable import SlotTable
    from .walcommit import LogCommitter


log = logging.getLogger("autosaved.rpc")


@dataclass
class RpcRequest:
    """One request as the daemon received it (the client's own ``Request`` is what it sends)."""

    op: str
    seq: int
    header: dict[str, Any]
    frames: Sequence[memoryview]
    owner: int
    header_size: int
    # A big request (offload.py): its header frame, decoded in a worker thread; until then ``header`` holds
    # only its leading fields. ``on_applied`` is called once its update is merged (or it failed): the
    # sender's next requests may start from then on.
    raw_header: memoryview | None = None
    on_applied: Callable[[], None] | None = None


def expires_of(header: dict[str, Any]) -> float | None:
    """The client's deadline for this request (``expires``: seconds since the epoch, the client's clock,
    which on ipc is this host's), or ``None`` from a client that sends none."""
    value = header.get("expires")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProtocolError("expires must be a time in seconds since the epoch")
    return float(value)


def check_expiry(request: RpcRequest, now: float) -> None:
    """Refuse a request its client has given up on (it waited past ``expires``): never applied late."""
    expires = expires_of(request.header)
    if expires is not None and now > expires:
        raise Expired(f"the request waited {now - expires:.3f}s past its client's deadline in the daemon's "
                      "queue (the daemon was busy); it was not applied",
                      details={"late_s": round(now - expires, 3)})


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

    def send_early(self, reply: Reply) -> bool:
        """From a log thread, before :meth:`resolve`: send ``reply`` now if the rpc loop allows it; the
        later :meth:`resolve` then only closes the request."""
        if self.early is not None and self.early(reply):
            self.sent_early = True
        return self.sent_early

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


class HandlerBase:
    """What the handlers of every concern share: the narrow context, whose jobs a request acts on,
    the job quota, a client's policy overrides."""

    def __init__(self, ctx: RpcContext) -> None:
        self.ctx = ctx

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

    @contextlib.asynccontextmanager
    async def _job_quota(self, owner: int, name: str) -> AsyncIterator[None]:
        """Refuse to create a job beyond ``quota.max_jobs`` (root is exempt), and count the job from the
        check until the block ends (the table takes it in meanwhile: concurrent creates of different names
        cannot all pass with one slot left). A job counts when its folder is on disk or it is loaded. O(1):
        the table keeps each owner's names (jobcount.py; an owner's folder is listed once per daemon run,
        at the first check that needs it)."""
        limit = self.ctx.config().quota.max_jobs
        if limit is None or owner == 0 or (owner, name) in self.ctx.table.jobs:
            yield
            return
        names = await self.ctx.table.names.of(owner)
        used = self.ctx.table.names.used(owner, names, name)
        if used is not None and used >= limit:
            raise QuotaExceeded(
                f"quota.max_jobs: uid {owner} already has {used} jobs (the limit is {limit}); delete one "
                "with `autosaved delete JOB` or ask the administrator to raise the quota",
                details={"quota": "max_jobs", "limit": limit, "used": used},
            )
        with self.ctx.table.names.creating(owner, name):
            yield

    def _job_name(self, req: RpcRequest) -> str:
        return validate_job_name(req.header.get("job"))

    def _requested_policy(self, req: RpcRequest) -> PolicySettings:
        """The policy a job not created yet would run under: the defaults with the request's overrides."""
        raw = req.header.get("policy")
        if raw is not None and not isinstance(raw, dict):
            raise ProtocolError("policy must be a map")
        return PolicySettings.parse(raw or {}, base=self.ctx.config().policy, where="policy")

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
