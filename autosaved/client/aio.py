"""The awaitable client (anyio on the asyncio backend): the same API as :class:`Client`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

import anyio
import zmq
import zmq.asyncio

from ..codec import TensorMode
from ..errors import AutosavedError, StateLost
from .base import (
    DEFAULT_SAVE_TIMEOUT,
    DEFAULT_TIMEOUT,
    Ack,
    ack_from,
    check_reachable,
    configure,
    resolve_address,
    timed_out,
)
from .core import ClientCore, Request
from .slots import SlotPool


class AsyncClient:
    """``async with autosaved.AsyncClient("job") as c: await c.update({...})``.

    Requests are serialised by a lock, so one client may be shared by several tasks.
    """

    def __init__(self, job: str, *, address: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 save_timeout: float = DEFAULT_SAVE_TIMEOUT, policy: Mapping[str, Any] | None = None,
                 on_state_lost: Callable[[StateLost], Awaitable[None]] | None = None) -> None:
        self._core = ClientCore(job, policy=policy)
        self.address = resolve_address(address)
        self.timeout = timeout
        self.save_timeout = save_timeout
        self.on_state_lost = on_state_lost
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._lock = anyio.Lock()
        self._slots = SlotPool(self.address, timeout=timeout)

    @property
    def job(self) -> str:
        return self._core.job

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    async def connect(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self._core.hello())
        return result

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        # After a timeout the daemon may still act on a queued update, so no slot may be reused.
        self._slots.reset()

    async def _call(self, req: Request, tensors: TensorMode = "numpy") -> Any:
        async with self._lock:
            return await self._call_locked(req, tensors)

    async def _call_locked(self, req: Request, tensors: TensorMode = "numpy") -> Any:
        timeout = self.save_timeout if req.long else self.timeout
        if self._sock is None:
            check_reachable(self.address)
            self._sock = self._ctx.socket(zmq.DEALER)
            configure(self._sock, self.address)
        sock = self._sock
        with anyio.move_on_after(timeout):
            # With no daemon connected a DEALER send waits forever: the timeout covers it too.
            await sock.send_multipart(req.frames, copy=True)
            while True:
                # poll-then-recv: a timeout cancels the poll, never a recv holding a message.
                if not await sock.poll(1000):
                    continue
                frames = [f.buffer for f in await sock.recv_multipart(copy=False)]
                header = self._core.matches(req, frames)
                if header is not None:
                    placed = self._slots.receive(header["shm"]) if req.op == "restore" and header.get("shm") else None
                    return self._core.finish(req, header, frames, tensors, placed)
        self.close()
        raise timed_out(self.address, req.op, timeout)

    async def update(self, delta: Mapping[Any, Any], *, step: int | None = None,
                     meta: Mapping[str, Any] | None = None, wait: str = "accepted") -> Ack:
        try:
            return await self._update(delta, step, meta, wait)
        except StateLost as lost:
            if self.on_state_lost is None:
                raise
            await self.on_state_lost(lost)
            return await self._update(delta, step, meta, wait)

    async def _update(self, delta: Mapping[Any, Any], step: int | None, meta: Mapping[str, Any] | None,
                      wait: str) -> Ack:
        def build() -> Request:
            return self._core.update(delta, step=step, meta=meta, wait=wait, placer=self._slots.place)

        # The lock spans building too: the slot pool and the seq counter are shared by every task.
        async with self._lock:
            # The copy into shared memory is a memcpy of the whole state: not on the event loop.
            req = await anyio.to_thread.run_sync(build)
            try:
                header = await self._call_locked(req)
            except AutosavedError as exc:
                if exc.code != "slot_unknown":
                    raise
                self._slots.reset()
                self._slots.retry_now()
                req = await anyio.to_thread.run_sync(build)
                header = await self._call_locked(req)
            self._slots.settle(header.get("held"))
            return ack_from(header, req.seq)

    async def save(self) -> int:
        version: int = await self._call(self._core.save())
        return version

    async def restore(self, version: int | None = None, *, tensors: TensorMode = "numpy") -> Any:
        async with self._lock:
            conn = await anyio.to_thread.run_sync(self._slots.restore_conn)
            return await self._call_locked(self._core.restore(version, conn), tensors)

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self._core.status())
        return result
