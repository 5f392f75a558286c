"""The awaitable client (anyio on the asyncio backend): the same API as :class:`Client`.

Only I/O lives here: :class:`AsyncConnection` performs the steps of the flows :mod:`.core` builds, with
the blocking shared-memory work (:class:`~autosaved.client.core.Local`) in worker threads.

The socket is a plain (blocking-API) ZeroMQ socket used with ``NOBLOCK``, and the event loop watches its
``FD`` only while a request waits: ``zmq.asyncio`` polled through a future per poll and per receive and
cost an ``aput`` about as much CPU as the daemon's whole handling of it (perf, issue 21).
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import anyio
import anyio.to_thread
import zmq

from ..codec import TensorMode
from ..errors import StateLost
from .base import (
    DEFAULT_SAVE_TIMEOUT,
    DEFAULT_TIMEOUT,
    Ack,
    JobFacade,
    check_reachable,
    configure,
    is_probe_reply,
    probe_frames,
    resolve_address,
    same_docs_as,
    timed_out,
)
from .core import ClientCore, Flow, Local, LostState, Receive, Send, Step
from .slots import SlotPool
from .sync import Client

T = TypeVar("T")


def _look(conn: weakref.ref[AsyncConnection]) -> None:
    """The reader of a connection's FD (see AsyncConnection._ready)."""
    alive = conn()
    if alive is not None:
        alive._look()


def _drop_reader(loop: asyncio.AbstractEventLoop, fd: int, _: object = None) -> None:
    if not loop.is_closed():
        loop.remove_reader(fd)


class AsyncConnection:
    """A DEALER socket to the daemon that runs flows, one at a time (a lock serialises them, so one
    client may be shared by several tasks: the seq counter and the slot pool are shared state)."""

    def __init__(self, address: str, *, timeout: float, save_timeout: float,
                 on_state_lost: Callable[[StateLost], Awaitable[None]] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.save_timeout = save_timeout
        self.on_state_lost = on_state_lost
        self.on_close = on_close
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        # Uncontended (one task per client, the usual case) it takes no trip through the event loop.
        self._lock = anyio.Lock(fast_acquire=True)
        self._op = ""
        self._limit = 0.0
        self._deadline = 0.0
        self._heard = False  # this socket has had a reply (see base.probe_frames)
        # (loop, FD, the weak reference the loop's reader holds): the socket's FD is registered once per
        # socket and loop, not once per wait (an add_reader and a remove_reader per reply were a sixth of an
        # aput's client CPU: perf, issue 21); _look wakes the one wait there is at a time (flows are serialised).
        self._watching: tuple[asyncio.AbstractEventLoop, int, weakref.ref[AsyncConnection]] | None = None
        self._waiter: asyncio.Future[bool] | None = None
        self._waiting_for = 0

    async def run(self, flow: Flow[T]) -> T:
        await self._lock.acquire()
        locked = True
        try:
            step = next(flow)
            while True:
                if isinstance(step, LostState) and self.on_state_lost is not None:
                    # The callback typically resends the full state through this same client: it needs the lock.
                    self._lock.release()
                    locked = False
                    await self.on_state_lost(step.error)
                    await self._lock.acquire()
                    locked = True
                    result: Any = True
                else:
                    result = await self._perform(step)
                step = flow.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        finally:
            flow.close()
            if locked:
                self._lock.release()

    def close(self) -> None:
        self._unwatch()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        self._heard = False
        if self.on_close is not None:
            self.on_close()

    async def _perform(self, step: Step) -> Any:
        if isinstance(step, Send):
            return await self._send(step)
        if isinstance(step, Receive):
            return await self._receive()
        if isinstance(step, Local):
            # Blocking work (a memcpy into shared memory, the fd socket): never on the event loop.
            return await anyio.to_thread.run_sync(step.run)
        return False  # a LostState with no callback: the flow raises StateLost

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            check_reachable(self.address)
            self._sock = self._ctx.socket(zmq.DEALER)
            configure(self._sock, self.address)
        return self._sock

    async def _send(self, step: Send) -> None:
        self._op = step.op
        self._limit = self.save_timeout if step.long else self.timeout
        self._deadline = anyio.current_time() + self._limit
        sock = self._socket()
        if step.long and not self._heard:
            await self._probe(sock)
        # With no daemon connected a DEALER cannot send: the timeout covers that wait too.
        if not await self._send_by(sock, step.frames, self._deadline):
            self._timed_out()

    async def _send_by(self, sock: zmq.Socket[bytes], frames: Sequence[bytes | memoryview], deadline: float) -> bool:
        while True:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=True)
                return True
            except zmq.Again:
                if not await self._ready(sock, zmq.POLLOUT, deadline):
                    return False

    async def _recv_by(self, sock: zmq.Socket[bytes], deadline: float) -> list[memoryview] | None:
        """The next message, or ``None`` at the deadline. Waiting holds no message: a cancelled wait loses none."""
        while True:
            # Ask EVENTS first (what _ready does): a reply is never there yet right after its request, and
            # the failed receive's zmq.Again cost three times the look (perf, issue 21).
            if not await self._ready(sock, zmq.POLLIN, deadline):
                return None
            try:
                return [f.buffer for f in sock.recv_multipart(zmq.NOBLOCK, copy=False)]
            except zmq.Again:
                continue

    async def _ready(self, sock: zmq.Socket[bytes], event: int, deadline: float) -> bool:
        """Wait until ``sock`` has ``event`` or the deadline passed (False)."""
        if sock.getsockopt(zmq.EVENTS) & event:  # type: ignore[operator]
            return True
        loop = asyncio.get_running_loop()
        fd: int = sock.FD
        if self._watching is None or self._watching[:2] != (loop, fd):
            self._unwatch()
            # The reader holds the connection weakly: a client dropped without close() is still collected,
            # and then its FD leaves the loop before its socket closes (what close() does).
            me = weakref.ref(self, functools.partial(_drop_reader, loop, fd))
            loop.add_reader(fd, _look, me)
            self._watching = (loop, fd, me)
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiter, self._waiting_for = waiter, event

        def expire() -> None:
            if not waiter.done():
                waiter.set_result(False)

        # anyio's clock on the asyncio backend is the loop's.
        timer = loop.call_at(max(loop.time(), deadline), expire)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _look(self) -> None:
        """The FD's reader. ZeroMQ's FD only says "look at EVENTS again": it stays readable until EVENTS is
        read, so every wake-up reads it, whether a wait is on or not."""
        if self._sock is None:
            return
        events = self._sock.getsockopt(zmq.EVENTS)
        waiter = self._waiter
        if waiter is not None and not waiter.done() and events & self._waiting_for:  # type: ignore[operator]
            waiter.set_result(True)

    def _unwatch(self) -> None:
        """Take the socket's FD off its loop, before the socket closes (a closed FD left registered breaks a
        later add_reader of its number). From another thread too: the selector's update is one call."""
        if self._watching is not None:
            loop, fd, _ = self._watching
            self._watching = None  # and with it the weak reference, whose callback then never runs
            _drop_reader(loop, fd)

    async def _probe(self, sock: zmq.Socket[bytes]) -> None:
        """A ping within the ordinary timeout before the first long op on this socket."""
        deadline = anyio.current_time() + self.timeout
        if await self._send_by(sock, probe_frames(), deadline):
            while (frames := await self._recv_by(sock, deadline)) is not None:
                if is_probe_reply(frames):
                    self._heard = True
                    return
        self._limit = self.timeout
        self._timed_out()

    async def _receive(self) -> list[memoryview]:
        frames = await self._recv_by(self._socket(), self._deadline)
        if frames is None:
            self._timed_out()
        self._heard = True
        return frames

    def _timed_out(self) -> NoReturn:
        # Drop the socket: a request still queued in it must not reach a daemon later.
        self.close()
        raise timed_out(self.address, self._op, self._limit)


@same_docs_as(Client)
class AsyncClient(JobFacade):
    """``async with autosaved.AsyncClient("job") as c: await c.update({...})``: :class:`Client`'s API,
    awaitable (each method's docstring is :class:`Client`'s). Requests are serialised by a lock, so one
    client may be shared by several tasks.
    """

    _core: ClientCore
    _conn: AsyncConnection

    def __init__(self, job: str, *, address: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 save_timeout: float = DEFAULT_SAVE_TIMEOUT, policy: Mapping[str, Any] | None = None,
                 on_state_lost: Callable[[StateLost], Awaitable[None]] | None = None) -> None:
        address = resolve_address(address)
        # After a timeout the daemon may still act on a queued update, so no slot may be reused.
        self._slots = SlotPool(address, timeout=timeout)
        self._core = ClientCore(job, policy=policy, slots=self._slots)
        self._core.timeouts = (timeout, save_timeout)
        self._conn = AsyncConnection(address, timeout=timeout, save_timeout=save_timeout,
                                     on_state_lost=on_state_lost, on_close=self._slots.reset)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    async def connect(self) -> dict[str, Any]:
        return await self._conn.run(self._core.hello())

    def close(self) -> None:
        self._conn.close()

    async def update(self, delta: Mapping[Any, Any], *, step: int | None = None,
                     meta: Mapping[str, Any] | None = None, wait: str = "accepted") -> Ack:
        return await self._conn.run(self._core.update(delta, step=step, meta=meta, wait=wait))

    async def save(self) -> int:
        return await self._conn.run(self._core.save())

    async def restore(self, version: int | None = None, *, tensors: TensorMode = "numpy",
                      path: Sequence[str | int] | None = None,
                      paths: Sequence[Sequence[str | int]] | None = None, step: int | None = None) -> Any:
        return await self._conn.run(self._core.restore(version, tensors, path, paths, step))

    async def status(self) -> dict[str, Any]:
        return await self._conn.run(self._core.status())
