"""The rpc server: binds the ROUTER socket, frames each request (size limit, header, who sent it, the
per-uid quota of requests in flight), hands it to the handlers and sends its one reply, inline, from a
task, or early from a log thread. It gets a narrow context, never the daemon (as :mod:`.fdserver`)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import anyio.to_thread
import zmq

from ..errors import (
    AutosavedError,
    Expired,
    Forbidden,
    InternalError,
    MessageTooLarge,
    ProtocolError,
    QuotaExceeded,
    ShuttingDown,
)
from ..fairqueue import FairQueue
from ..protocol import check_request, error_reply, ok_reply, pack_header, unpack_header
from ..storage import faults
from ..storage.faults import point
from . import offload
from .connguard import ConnGuard
from .replybudget import SEND_HWM, TRACK_MIN, ReplyBudget, over_budget
from .rpcbase import Deferred, Reply, RpcRequest, Started, check_expiry, expires_of, finish
from .rpcsocket import Receiver, SharedSocket
from .runstate import RunState

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("autosaved.daemon")


def peer_uid(frame: Any) -> int | None:
    """The uid of the process on the other end of an ipc connection, or ``None`` when it cannot be told.

    libzmq reports ``Peer-Address`` on ipc as ``<addr>:<uid>:<gid>:<pid>`` from SO_PEERCRED. An unknown
    identity is never guessed (falling back on the daemon's own uid would give a root daemon's powers to
    anyone): the caller refuses the request. On tcp there is no uid at all; see :meth:`RpcServer.owner_of`.
    """
    try:
        addr = frame.get("Peer-Address")
    except Exception:
        return None
    parts = str(addr).split(":")
    if len(parts) >= 4 and parts[-3].isdigit():
        return int(parts[-3])
    return None


# What a request costs in the fair queue beyond its bytes: a flood of tiny requests is not free.
REQUEST_COST = 1024
# Requests of these ops that one user may have running as tasks at once; more wait in the user's queue.
# Each running one puts steps on the event loop's ready queue (a flood of deletes or restores kept 256 of
# them there, ahead of every other user's request); updates and saves are not capped (a committed
# update waits for its save for long, costing the loop nothing meanwhile).
CAPPED_OPS = frozenset({"delete", "restore", "status", "list", "verify", "gc"})
TASKS_PER_USER = 8
ERROR_LINES_PER_S = 50
REFUSALS_PER_S = 200


class LineBudget:
    """At most :data:`ERROR_LINES_PER_S` lines a second for failed requests (issue 19: one user's flood of
    refused requests spent a fifth of the event loop on log lines); each second's surplus is counted
    and said in one line. Every error is still counted (metrics) and answered."""

    def __init__(self) -> None:
        self._second = -1
        self._lines = 0
        self._skipped = 0

    def allow(self, now: float) -> bool:
        second = int(now)
        if second != self._second:
            if self._skipped:
                log.info("%d more failed requests not logged in the previous second(s)", self._skipped)
            self._second, self._lines, self._skipped = second, 0, 0
        self._lines += 1
        if self._lines > ERROR_LINES_PER_S:
            self._skipped += 1
            return False
        return True


class RefusalBudget:
    """At most :data:`REFUSALS_PER_S` ``quota.max_requests`` refusals answered per user a second; past
    it a user's requests over the quota are dropped unanswered (counted: ``status`` ``daemon.edge``). A
    client that sends that many past its quota is not waiting for the answers. The connection that went
    past it is muted for the rest of that second: its messages are dropped before their header is read
    (each one read, checked and refused cost the event loop tens of microseconds, issue 19), and on ipc it
    is cut, with the socket file closed to its user for that long (connguard.ConnGuard.cut)."""

    def __init__(self) -> None:
        self._second = -1
        self._answered: dict[int, int] = {}
        self._muted: set[bytes] = set()

    def _roll(self, now: float) -> None:
        second = int(now)
        if second != self._second:
            self._second = second
            self._answered.clear()  # O(users refused in the last second), once a second
            self._muted.clear()

    def allow(self, uid: int, now: float) -> bool:
        self._roll(now)
        n = self._answered.get(uid, 0) + 1
        self._answered[uid] = n
        return n <= REFUSALS_PER_S

    def mute(self, identity: bytes) -> None:
        self._muted.add(identity)

    def muted(self, identity: bytes, now: float) -> bool:
        if not self._muted:
            return False
        self._roll(now)
        return identity in self._muted


@dataclass
class Queued:
    """A request received and checked at the edge, waiting for its turn (fairqueue.py)."""

    identity: bytes
    seq: int
    request: RpcRequest


@dataclass(frozen=True)
class RpcServerContext:
    config: Callable[[], Config]
    # Begins a request (Handlers.start): its reply, one to come, or the coroutine that finishes it.
    start: Callable[[RpcRequest], Started]
    run: RunState
    clock: Callable[[], float]
    boot: str
    uid: int  # the daemon's own: every tcp peer acts as it
    # Gives a socket file to the clients' group, if one is configured (AutosavedError when it cannot).
    give_to_socket_group: Callable[[Path], None]
    # Connections each listener may hold at once (max_connections, fitted to the fd limit).
    listener_cap: Callable[[], int]
    # Bytes of restore buffers (memfds) the fd server holds for a uid (None: for everyone).
    restore_bytes: Callable[[int | None], int]


class RpcServer:
    def __init__(self, ctx: RpcServerContext) -> None:
        self.ctx = ctx
        self.in_flight_by_uid: dict[int, int] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._receiver: Receiver | None = None
        # The connection guard of the ipc socket.
        self.conn_guard: ConnGuard | None = None
        # Big replies each user has queued and not yet read (quota.max_reply_bytes).
        self.replies = ReplyBudget()
        self._shared: SharedSocket | None = None
        # Per uid, logged updates a log thread answered whose request the event loop has not closed yet: not
        # in flight for the quota (their client may already send the next one).
        self._early_lock = threading.Lock()
        self._early_sent: dict[int, int] = {}
        # When the rpc loop last went round: the watchdog pings only while this keeps moving.
        self.progress_at = ctx.clock()
        # Requests received and not started yet, per user: served in fair order, not arrival order.
        self.queue: FairQueue[Queued] = FairQueue()
        self._dispatching = False
        self.expired = 0
        self._error_lines = LineBudget()
        self._refusals = RefusalBudget()
        self._tasks_by_uid: dict[int, int] = {}

    def bind(self, stack: contextlib.AsyncExitStack) -> zmq.Socket[Any]:
        config = self.ctx.config()
        # A plain socket, not zmq.asyncio: see rpcsocket.py for why and how the event loop watches it.
        ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
        stack.callback(ctx.term)
        sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        # A frame over the limit makes libzmq drop that peer's connection: the cheapest defence against a
        # client that would make the daemon allocate without bound. The total over all frames is
        # checked per message, with an error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # A peer that does not read gets at most SEND_HWM replies queued; past it (or once it is gone) a
        # send fails at once (ROUTER_MANDATORY) and the reply is dropped and counted, never held.
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(config.address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise AutosavedError(f"cannot listen on {config.address}: {exc}") from None
        self._shared = SharedSocket(sock)  # log threads answer logged updates on it too
        stack.callback(self._shared.close)
        path = config.socket_path()
        if path is not None:
            os.chmod(path, 0o660)
            self.ctx.give_to_socket_group(path)
        self.conn_guard = ConnGuard(None if path is None else str(path), total_cap=self.ctx.listener_cap(),
                                    per_user=lambda: self.ctx.config().quota.max_connections)
        self.conn_guard.watch(ctx, sock, self._shared.lock)
        stack.callback(self.conn_guard.stop)
        self._sock = sock
        return sock

    @contextlib.contextmanager
    def reply_reserve(self, uid: int, size: int) -> Iterator[None]:
        """Charge a reply being built (a restore's reads, its memfd) to ``uid``, or refuse it (quota)."""
        held = self.replies.held(uid) + self.ctx.restore_bytes(uid)
        limit = self.ctx.config().quota.max_reply_bytes
        why = over_budget(uid, held, size, limit)
        if why is not None:
            self.replies.refused += 1
            raise QuotaExceeded(why, details={"quota": "max_reply_bytes", "used": held, "limit": limit})
        with self.replies.building_reply(uid, size):
            yield

    def edge_report(self) -> dict[str, Any]:
        """The ipc socket's connections, the requests in flight and the replies queued, dropped, refused."""
        guard = self.conn_guard
        return {
            "ipc": {"open": guard.total if guard else 0, "peak": guard.peak if guard else 0,
                    "refused": guard.refused if guard else 0, "closed": guard.closed if guard else False,
                    "cut_for_flooding": guard.cut_count if guard else 0,
                    "missed_disconnects": guard.reconciled if guard else 0},
            "requests_in_flight": sum(self.in_flight_by_uid.values()),
            "requests_queued": len(self.queue), "requests_expired": self.expired,
            "requests_unanswered": self.ctx.run.requests_unanswered,
            "decode_cpu": {"throttled_s": round(offload.shares.throttled_s, 3) if offload.shares else 0.0,
                           "users_charged": offload.shares.users_charged() if offload.shares else 0},
            "replies": {"queued_bytes": self.replies.total(),
                        "dropped": self.replies.dropped + (self._shared.dropped if self._shared else 0),
                        "refused": self.replies.refused,
                        "restore_buffer_bytes": self.ctx.restore_bytes(None)},
        }

    async def run(self, tg: anyio.abc.TaskGroup) -> None:
        """The rpc loop; requests that must wait get a task of ``tg``."""
        self._tg = tg
        assert self._sock is not None and self._tg is not None
        assert self._shared is not None
        with Receiver(self._sock, self._handle, self._shared.lock, after_batch=self._dispatch) as receiver:
            self._receiver = self._shared.receiver = receiver
            try:
                while True:
                    self.progress_at = self.ctx.clock()
                    if faults.active():  # the tests' hung event loop (loop.tick) and stalled rpc loop (rpc.poll)
                        faults.point("loop", "tick", "before")
                        await anyio.to_thread.run_sync(faults.point, "rpc", "poll", "before")
                    # Requests are received and started from the socket's fd callback for a second, then
                    # the loop goes round (the watchdog's proof of progress); see rpcsocket.py.
                    await receiver.serve(1.0)
                    self.replies.sweep()
            finally:
                self._receiver = self._shared.receiver = None
                for owner, queued in self.queue.drain():  # never started: said so, not left to time out
                    self._done(owner)
                    self._send_error(queued.identity, queued.seq,
                                     ShuttingDown("the daemon is stopping; this request was not applied"))

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """Check one request at the edge and queue it under its sender (:meth:`_dispatch` starts it in
        fair order once the batch is in). A big header (offload.py) is not decoded here: its leading
        fields are enough to check it and to refuse it."""
        if len(frames) < 2:
            return  # nothing to answer: a ROUTER frame with no content
        identity = frames[0].bytes
        self.ctx.run.requests += 1
        if self._refusals.muted(identity, time.monotonic()):
            self._unanswered()
            return
        seq: int | None = None
        config = self.ctx.config()
        try:
            total = sum(len(f) for f in frames[1:])
            if total > config.max_message_bytes:
                raise MessageTooLarge(
                    f"message of {total} bytes is over the daemon's max_message_bytes ({config.max_message_bytes})"
                )
            header_frame = frames[1]
            big = len(header_frame) > offload.OFFLOAD_MIN
            header = offload.peek_header(header_frame.buffer) if big else unpack_header(header_frame.buffer)
            raw_seq = header.get("seq")
            seq = raw_seq if isinstance(raw_seq, int) and not isinstance(raw_seq, bool) else None
            op, seq = check_request(header)
            owner = self.owner_of(header_frame)
            offload.note_request(owner)
            point("task", "rpc", "before", op)
            counted = self.in_flight_by_uid.get(owner, 0)
            # A request counts until its reply has left: big replies still queued in libzmq count too.
            in_flight = counted - self._early_sent.get(owner, 0) + self.replies.queued(owner)[1]
            if in_flight >= config.quota.max_requests:
                if not self._refusals.allow(owner, time.monotonic()):
                    # Past its budget of refusals this second: dropped unanswered, counted. Each answer cost the
                    # event loop a send (issue 19: a flood past the quota took 60% of the loop in error replies).
                    self._unanswered()
                    self._refusals.mute(identity)
                    self._cut(header_frame, owner)
                    return
                raise QuotaExceeded(
                    f"quota.max_requests: uid {owner} already has {in_flight} requests in flight (the limit is "
                    f"{config.quota.max_requests}); wait for their replies",
                    details={"quota": "max_requests", "limit": config.quota.max_requests, "used": in_flight},
                )
            expires_of(header)
            request = RpcRequest(op=op, seq=seq, header=header, frames=[f.buffer for f in frames[2:]],
                                 owner=owner, header_size=len(header_frame),
                                 raw_header=header_frame.buffer if big else None)
        except Exception as exc:
            self._send_error(identity, seq, exc)
            return
        # Counted from now on, queued or started: quota.max_requests bounds each user's queue too.
        self.in_flight_by_uid[owner] = counted + 1
        self.queue.push(owner, Queued(identity, seq, request), total + REQUEST_COST)

    def _cut(self, frame: zmq.Frame, owner: int) -> None:
        """Cut the connection a flood past the refusal budget came on (connguard.ConnGuard.cut): muted, its
        requests would still each be received on the event loop."""
        guard = self.conn_guard
        if guard is None:
            return
        try:
            fd = int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, TypeError, ValueError):
            return
        guard.cut(fd, owner)

    def _unanswered(self) -> None:
        """A request over its user's quota dropped without an answer: counted as both."""
        self.ctx.run.requests_unanswered += 1
        self.ctx.run.quota_refusals += 1

    def _dispatch(self) -> None:
        """Start the queued requests, in fair order: each user's in the order they came."""
        if self._dispatching:
            return  # a request started below released a user: the loop here serves them
        self._dispatching = True
        try:
            while (nxt := self.queue.pop(self._may_start)) is not None:
                self._start(nxt[1])
        finally:
            self._dispatching = False

    def _may_start(self, owner: int, queued: Queued) -> bool:
        return queued.request.op not in CAPPED_OPS or self._tasks_by_uid.get(owner, 0) < TASKS_PER_USER

    def _start(self, queued: Queued) -> None:
        """Start one request: answered here when it needs no waiting (most small updates), else handed
        to a task of its own that answers when it is done."""
        identity, seq, request = queued.identity, queued.seq, queued.request
        owner = request.owner
        try:
            check_expiry(request, time.time())
            if request.raw_header is not None:
                assert self._tg is not None
                # Nothing more of this user starts until it is merged: their requests keep their order.
                self.queue.hold(owner)
                self._tg.start_soon(self._finish_big, identity, seq, request)
                return
            started = self.ctx.start(request)
        except Exception as exc:
            self._done(owner)
            self._send_error(identity, seq, exc)
            return
        if isinstance(started, Reply):
            self._answer(identity, seq, owner, started)
        elif isinstance(started, Deferred):
            deferred = started
            deferred.early = lambda reply: self._answer_early(identity, seq, owner, reply)
            deferred.on_done(lambda result: self._answered(owner) if deferred.sent_early
                             else self._answer(identity, seq, owner, result))
        else:
            assert self._tg is not None
            capped = request.op in CAPPED_OPS
            if capped:
                self._tasks_by_uid[owner] = self._tasks_by_uid.get(owner, 0) + 1
            self._tg.start_soon(self._finish, identity, seq, owner, started, capped)

    async def _finish_big(self, identity: bytes, seq: int, request: RpcRequest) -> None:
        """A big request: its header decoded in a worker thread (offload.py), then started and answered.
        Its user is held (no other request of theirs starts) until it is merged or has failed."""
        owner = request.owner
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.queue.release(owner)
                self._dispatch()

        request.on_applied = release
        try:
            try:
                assert request.raw_header is not None
                header = await offload.off_loop(offload.unpack_sliced, request.raw_header, owner=owner)
                op, full_seq = check_request(header)
                if (op, full_seq) != (request.op, seq):
                    raise ProtocolError("a big request's header must lead with v, op and seq")
                request.header, request.raw_header = header, None
                check_expiry(request, time.time())
                started = self.ctx.start(request)
                if request.op != "update":
                    release()  # started: as any request, it runs beside the user's next ones
                result: Reply | Exception = await finish(started)
            except Exception as exc:
                result = exc
        except BaseException:
            self._done(owner)
            raise
        finally:
            release()
        self._answer(identity, seq, owner, result)

    def _answer(self, identity: bytes, seq: int, owner: int, result: Reply | Exception) -> None:
        """Send a request's one reply (an error reply for an exception, or for a reply that cannot be sent)."""
        self._done(owner)
        if isinstance(result, Reply):
            try:
                size = sum(memoryview(f).nbytes for f in result.frames)
                if size >= TRACK_MIN:
                    held = self.replies.held(owner) + self.ctx.restore_bytes(owner)
                    why = over_budget(owner, held, size, self.ctx.config().quota.max_reply_bytes)
                    if why is not None:
                        self.replies.dropped += 1
                        raise QuotaExceeded(why, details={"quota": "max_reply_bytes", "used": held,
                                                          "limit": self.ctx.config().quota.max_reply_bytes})
                self._send(identity, ok_reply(seq, self.ctx.boot, **result.fields), result.frames,
                           track_for=owner if size >= TRACK_MIN else None, size=size)
                return
            except Exception as exc:
                result = exc
        self._send_error(identity, seq, result)

    def _answer_early(self, identity: bytes, seq: int, owner: int, reply: Reply) -> bool:
        """From a log thread, right after the sync: send a logged update's reply (False: not sent, the
        event loop answers as usual). The event loop closes the request later (:meth:`_answered`)."""
        frames = [identity, pack_header(ok_reply(seq, self.ctx.boot, **reply.fields)), *reply.frames]
        with self._early_lock:  # counted before the client can see the reply and send its next request
            self._early_sent[owner] = self._early_sent.get(owner, 0) + 1
        if self._shared is not None and self._shared.send_from_thread(frames):
            return True
        self._uncount_early(owner)
        return False

    def _answered(self, owner: int) -> None:
        self._uncount_early(owner)
        self._done(owner)

    def _uncount_early(self, owner: int) -> None:
        with self._early_lock:
            left = self._early_sent[owner] - 1
            if left:
                self._early_sent[owner] = left
            else:
                del self._early_sent[owner]

    async def _finish(self, identity: bytes, seq: int, owner: int, started: Coroutine[Any, Any, Reply],
                      capped: bool = False) -> None:
        """The rest of a request that had to wait (a load from disk, a save), and its reply."""
        try:
            try:
                result: Reply | Exception = await started
            except Exception as exc:
                result = exc
            except BaseException:
                self._done(owner)
                raise
        finally:
            if capped:
                left = self._tasks_by_uid[owner] - 1
                if left:
                    self._tasks_by_uid[owner] = left
                else:
                    del self._tasks_by_uid[owner]
        self._answer(identity, seq, owner, result)
        if capped and self.queue.queued(owner):
            self._dispatch()  # the user's next capped request may start now

    def _done(self, owner: int) -> None:
        left = self.in_flight_by_uid[owner] - 1
        if left:
            self.in_flight_by_uid[owner] = left
        else:
            del self.in_flight_by_uid[owner]

    def _send_error(self, identity: bytes, seq: int | None, exc: Exception) -> None:
        self.ctx.run.errors += 1
        if isinstance(exc, Expired):
            self.expired += 1
            self.ctx.run.expired += 1
        if getattr(exc, "code", None) == "quota":
            self.ctx.run.quota_refusals += 1
        if isinstance(exc, AutosavedError):
            if self._error_lines.allow(time.monotonic()):
                if not isinstance(exc, ProtocolError):
                    log.info("request failed seq=%s code=%s error=%s", seq, exc.code, exc.message)
                else:
                    log.warning("bad request seq=%s: %s", seq, exc.message)
            error = exc
        else:
            log.error("internal error handling a request", exc_info=exc)
            error = InternalError(f"internal error: {exc!r}")
        self._send(identity, error_reply(seq, self.ctx.boot, error), ())

    def owner_of(self, header_frame: Any) -> int:
        """Whose request this is. tcp carries no identity: it is the documented trusted-only setup, where
        every peer acts as the daemon's own user. On ipc an identity the kernel did not tell is refused."""
        if self.ctx.config().address.startswith("tcp://"):
            return self.ctx.uid
        uid = peer_uid(header_frame)
        if uid is None:
            raise Forbidden("cannot tell which user sent this request (no peer credentials); refused")
        return uid

    def _send(self, identity: bytes, header: dict[str, Any], frames: Any, *, track_for: int | None = None,
              size: int = 0) -> None:
        """Send a reply now. A ROUTER's send never blocks, and a sync send is whole before anything else
        runs, so replies need no lock and no await. A big reply is charged to ``track_for`` until libzmq
        lets go of it; a reply that cannot be queued is dropped and counted (SharedSocket.dropped)."""
        assert self._shared is not None
        pending, tracker = self._shared.send([identity, pack_header(header), *frames], track=track_for is not None)
        if track_for is not None and tracker is not None and not tracker.done:
            self.replies.add(track_for, tracker, size)
        if pending and self._receiver is not None:
            self._receiver.after_send()
