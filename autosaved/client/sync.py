"""The blocking client: ``with autosaved.Client("job") as c: c.update({...})``.

Only I/O lives here: :class:`Connection` performs the steps of the flows :mod:`.core` builds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

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
    timed_out,
)
from .core import ClientCore, Flow, Local, Receive, Send, Step, drive
from .slots import SlotPool

T = TypeVar("T")
RCVTIMEO_SLACK_MS = 100


class Connection:
    """A DEALER socket to the daemon that runs flows. ``on_close`` runs whenever the socket is dropped
    (on close, and after a timeout, when a request may still be queued in it)."""

    def __init__(self, address: str, *, timeout: float, save_timeout: float,
                 on_state_lost: Callable[[StateLost], None] | None = None,
                 on_close: Callable[[], None] | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self.save_timeout = save_timeout
        self.on_state_lost = on_state_lost
        self.on_close = on_close
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._op = ""
        self._limit = 0.0
        self._deadline = 0.0
        self._heard = False  # this socket has had a reply (see base.probe_frames)
        # The SNDTIMEO / RCVTIMEO (ms) set on the socket: set again only when they must change (a setsockopt
        # per request, and a Poller per reply, were a tenth of a small request's client CPU: perf, issue 21).
        self._sndtimeo = self._rcvtimeo = -1

    def run(self, flow: Flow[T]) -> T:
        return drive(flow, self._perform)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        self._heard = False
        self._sndtimeo = self._rcvtimeo = -1
        if self.on_close is not None:
            self.on_close()

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            check_reachable(self.address)
            self._sock = self._ctx.socket(zmq.DEALER)
            configure(self._sock, self.address)
        return self._sock

    def _perform(self, step: Step) -> Any:
        if isinstance(step, Send):
            return self._send(step)
        if isinstance(step, Receive):
            return self._receive()
        if isinstance(step, Local):
            return step.run()
        if self.on_state_lost is None:
            return False
        self.on_state_lost(step.error)
        return True

    def _send(self, step: Send) -> None:
        self._op = step.op
        self._limit = self.save_timeout if step.long else self.timeout
        self._deadline = time.monotonic() + self._limit
        sock = self._socket()
        # With no daemon connected a DEALER send blocks forever: bound it like the reply.
        ms = max(1, int(self._limit * 1000))
        if ms != self._sndtimeo:
            sock.setsockopt(zmq.SNDTIMEO, ms)
            self._sndtimeo = ms
        if step.long and not self._heard:
            self._probe(sock)
        try:
            sock.send_multipart(step.frames, copy=True)
        except zmq.Again:
            self.close()
            raise timed_out(self.address, self._op, self._limit) from None

    def _probe(self, sock: zmq.Socket[bytes]) -> None:
        """A ping within the ordinary timeout before the first long op on this socket."""
        deadline = time.monotonic() + self.timeout
        try:
            sock.send_multipart(probe_frames(), copy=True)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sock.poll(max(1, int(remaining * 1000)), zmq.POLLIN):
                    break
                if is_probe_reply([f.buffer for f in sock.recv_multipart(copy=False)]):
                    self._heard = True
                    return
        except zmq.Again:
            pass
        self.close()
        raise timed_out(self.address, self._op, self.timeout)

    def _receive(self) -> list[memoryview]:
        sock = self._socket()
        while True:
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                # Drop the socket: a request still queued in it must not reach a daemon later.
                self.close()
                raise timed_out(self.address, self._op, self._limit)
            # A blocking receive bounded by RCVTIMEO, never past the deadline; the one set before is kept
            # while it ends at most RCVTIMEO_SLACK_MS early (then this loop waits for the rest).
            ms = max(1, int(remaining * 1000))
            if not ms - RCVTIMEO_SLACK_MS <= self._rcvtimeo <= ms:
                sock.setsockopt(zmq.RCVTIMEO, ms)
                self._rcvtimeo = ms
            try:
                frames = sock.recv_multipart(copy=False)
            except zmq.Again:
                continue
            self._heard = True
            return [f.buffer for f in frames]


class Client(JobFacade):
    """A connection from a trainer to the local autosaved daemon, for one job.

    ``timeout`` bounds every ordinary request (seconds); ``save_timeout`` bounds requests that wait for a
    commit (``save()``, ``update(wait="committed")``, ``restore()``). ``on_state_lost`` is called with the
    :class:`~autosaved.StateLost` error when the daemon restarted and lost acknowledged deltas; the update
    that found out is sent again after it returns. Without it, ``update()`` raises ``StateLost``.
    """

    _core: ClientCore
    _conn: Connection

    def __init__(self, job: str, *, address: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 save_timeout: float = DEFAULT_SAVE_TIMEOUT, policy: Mapping[str, Any] | None = None,
                 on_state_lost: Callable[[StateLost], None] | None = None) -> None:
        address = resolve_address(address)
        # After a timeout the daemon may still act on a queued update, so no slot may be reused.
        self._slots = SlotPool(address, timeout=timeout)
        self._core = ClientCore(job, policy=policy, slots=self._slots)
        self._core.timeouts = (timeout, save_timeout)
        self._conn = Connection(address, timeout=timeout, save_timeout=save_timeout, on_state_lost=on_state_lost,
                                on_close=self._slots.reset)

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def connect(self) -> dict[str, Any]:
        """Say hello: checks the daemon is there and registers this client's policy overrides."""
        return self._conn.run(self._core.hello())

    def close(self) -> None:
        """Drop the connection (a later request opens a new one); the daemon keeps the job's state."""
        self._conn.close()

    def update(self, delta: Mapping[Any, Any], *, step: int | None = None,
               meta: Mapping[str, Any] | None = None, wait: str = "accepted") -> Ack:
        """Deep-merge ``delta`` into the job's state (mappings merge, other values replace,
        ``autosaved.DELETE`` removes) and return once the daemon acknowledged it at level ``wait``."""
        return self._conn.run(self._core.update(delta, step=step, meta=meta, wait=wait))

    def save(self) -> int:
        """Commit a version that contains every update so far; returns its id."""
        return self._conn.run(self._core.save())

    def restore(self, version: int | None = None, *, tensors: TensorMode = "numpy",
                path: Sequence[str | int] | None = None, paths: Sequence[Sequence[str | int]] | None = None,
                step: int | None = None) -> Any:
        """The job's newest state (everything the daemon accepted), or stored version ``version``, or the
        newest stored version at ``step`` (``NotFound`` if none); ``None`` when the job has no state.
        Arrays come back as numpy, or torch with ``tensors="torch"``.
        ``path`` (keys from the root, e.g. ``("threads", "t1")``) returns only that subtree, and only its
        leaves are read and sent; ``None`` when nothing is there. ``paths``: several subtrees in one
        request, returned as a list in the same order."""
        return self._conn.run(self._core.restore(version, tensors, path, paths, step))

    def status(self) -> dict[str, Any]:
        """The job as the daemon sees it: dirty bytes, step, latest version, the last save, its policy (and
        ``remote``, its replication, when a store is configured)."""
        return self._conn.run(self._core.status())
