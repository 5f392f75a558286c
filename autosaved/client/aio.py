"""The awaitable client (anyio on the asyncio backend): the same API as :class:`Client`.

Only I/O lives here: :class:`AsyncConnection` performs the steps of the flows :mod:`.core` builds, with
the blocking shared-memory work (:class:`~autosaved.client.core.Local`) in worker threads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import zmq
import zmq.asyncio

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
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = anyio.Lock()
        self._op = ""
        self._limit = 0.0
        self._deadline = 0.0
        self._heard = False  # this socket has had a reply (see base.probe_frames)

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

    def _socket(self) -> zmq.asyncio.Socket:
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
        # With no daemon connected a DEALER send waits forever: the timeout covers it too.
        with anyio.move_on_after(self._limit):
            await sock.send_multipart(step.frames, copy=True)
            return
        self._timed_out()

    async def _probe(self, sock: zmq.asyncio.Socket) -> None:
        """A ping within the ordinary timeout before the first long op on this socket."""
        with anyio.move_on_after(self.timeout):
            await sock.send_multipart(probe_frames(), copy=True)
            while True:
                if await sock.poll(100) and is_probe_reply(
                        [f.buffer for f in await sock.recv_multipart(copy=False)]):
                    self._heard = True
                    return
        self._limit = self.timeout
        self._timed_out()

    async def _receive(self) -> list[memoryview]:
        sock = self._socket()
        while True:
            remaining = self._deadline - anyio.current_time()
            if remaining <= 0:
                self._timed_out()
            # poll-then-recv: the poll's own timeout ends the wait, never a cancelled recv holding a message.
            if await sock.poll(max(1, int(min(remaining, 1.0) * 1000))):
                self._heard = True
                return [f.buffer for f in await sock.recv_multipart(copy=False)]

    def _timed_out(self) -> None:
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
