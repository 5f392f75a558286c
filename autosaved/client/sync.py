"""The blocking client: ``with autosaved.Client("job") as c: c.update({...})``."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import zmq

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


class Client:
    """A connection from a trainer to the local autosaved daemon, for one job.

    ``timeout`` bounds every ordinary request (seconds); ``save_timeout`` bounds requests that wait for a
    commit (``save()``, ``update(wait="committed")``, ``restore()``). ``on_state_lost`` is called with the
    :class:`~autosaved.StateLost` error when the daemon restarted and lost acknowledged deltas; the update
    that found out is sent again after it returns. Without it, ``update()`` raises ``StateLost``.
    """

    def __init__(self, job: str, *, address: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 save_timeout: float = DEFAULT_SAVE_TIMEOUT, policy: Mapping[str, Any] | None = None,
                 on_state_lost: Callable[[StateLost], None] | None = None) -> None:
        self._core = ClientCore(job, policy=policy)
        self.address = resolve_address(address)
        self.timeout = timeout
        self.save_timeout = save_timeout
        self.on_state_lost = on_state_lost
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._slots = SlotPool(self.address, timeout=timeout)

    @property
    def job(self) -> str:
        return self._core.job

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> dict[str, Any]:
        """Say hello: checks the daemon is there and registers this client's policy overrides."""
        result: dict[str, Any] = self._call(self._core.hello())
        return result

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        # After a timeout the daemon may still act on a queued update, so no slot may be reused.
        self._slots.reset()

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            check_reachable(self.address)
            self._sock = self._ctx.socket(zmq.DEALER)
            configure(self._sock, self.address)
        return self._sock

    def _call(self, req: Request, tensors: TensorMode = "numpy") -> Any:
        timeout = self.save_timeout if req.long else self.timeout
        sock = self._socket()
        deadline = time.monotonic() + timeout
        # With no daemon connected a DEALER send blocks forever: bound it like the reply.
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout * 1000)))
        try:
            sock.send_multipart(req.frames, copy=True)
        except zmq.Again:
            self.close()
            raise timed_out(self.address, req.op, timeout) from None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000)), zmq.POLLIN):
                # Drop the socket: a request still queued in it must not reach a daemon later.
                self.close()
                raise timed_out(self.address, req.op, timeout)
            frames = [f.buffer for f in sock.recv_multipart(copy=False)]
            header = self._core.matches(req, frames)
            if header is not None:
                placed = self._slots.receive(header["shm"]) if req.op == "restore" and header.get("shm") else None
                return self._core.finish(req, header, frames, tensors, placed)

    def update(self, delta: Mapping[Any, Any], *, step: int | None = None,
               meta: Mapping[str, Any] | None = None, wait: str = "accepted") -> Ack:
        """Deep-merge ``delta`` into the job's state (mappings merge, other values replace,
        ``autosaved.DELETE`` removes) and return once the daemon acknowledged it at level ``wait``."""
        try:
            return self._update(delta, step, meta, wait)
        except StateLost as lost:
            if self.on_state_lost is None:
                raise
            self.on_state_lost(lost)
            return self._update(delta, step, meta, wait)

    def _update(self, delta: Mapping[Any, Any], step: int | None, meta: Mapping[str, Any] | None,
                wait: str) -> Ack:
        req = self._core.update(delta, step=step, meta=meta, wait=wait, placer=self._slots.place)
        try:
            header = self._call(req)
        except AutosavedError as exc:
            if exc.code != "slot_unknown":
                raise
            # A new daemon does not know our slots: start a fresh pool and send once more.
            self._slots.reset()
            self._slots.retry_now()
            req = self._core.update(delta, step=step, meta=meta, wait=wait, placer=self._slots.place)
            header = self._call(req)
        self._slots.settle(header.get("held"))
        return ack_from(header, req.seq)

    def save(self) -> int:
        """Commit a version that contains every update so far; returns its id."""
        version: int = self._call(self._core.save())
        return version

    def restore(self, version: int | None = None, *, tensors: TensorMode = "numpy") -> Any:
        """The job's newest state (everything the daemon accepted), or stored version ``version``;
        ``None`` when the job has no state. Arrays come back as numpy, or torch with ``tensors="torch"``."""
        return self._call(self._core.restore(version, self._slots.restore_conn()), tensors)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call(self._core.status())
        return result
