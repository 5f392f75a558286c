"""The rpc socket on the event loop, without ``zmq.asyncio``.

Measured (issue 14, 2 cores, ipc, a small echo): a raw ZeroMQ round trip costs ~33 µs; with the ROUTER
behind ``zmq.asyncio`` (await poll, await recv, await send) ~85-95 µs; with a plain socket whose fd the
event loop watches, drained with non-blocking receives and answered with non-blocking sends, ~38 µs.
So the daemon keeps a plain ``zmq.Socket``, and while the rpc loop serves, messages are received and
handed over straight from the event loop's fd callback: no task switch and no await per message.
Nothing here ever waits inside libzmq: a ROUTER's send never blocks (a peer over its high-water mark
loses the message, as it would with ``zmq.asyncio``), and a receive is only tried with ``NOBLOCK``. No
await lies between a receive and the hand-off of its message, so a cancellation can never lose one.

libzmq's ``FD`` is a signal, not a level: it is readable when the socket's command queue has something,
and reading ``EVENTS`` (or any send or receive) empties that queue. So readiness is always decided by
``EVENTS``, and a send, which may swallow the signal of a message that arrived meanwhile, is followed by
:meth:`Receiver.after_send`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import anyio
import zmq

log = logging.getLogger("autosaved.daemon")

# Messages handled in one go before the event loop gets a turn (other tasks, timers) under a flood.
BATCH = 64
# Messages received before ``after_batch`` starts them (the rpc server's fair order applies within it):
# a request waits for at most this many others' edge checks before it starts.
MINI_BATCH = 16


class SharedSocket:
    """The ROUTER socket, shared by the event loop and the log threads, which send the reply of a ``logged``
    update themselves right after its sync (issue 21: waking the event loop to answer cost a ``logged``
    update 100-190 µs of its ~0.5 ms). A libzmq socket is not thread-safe, but may be used from several
    threads with a full memory barrier between uses: every use takes :attr:`lock` (uncontended, ~0.1 µs)."""

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.closed = False
        # Set while the rpc loop serves: a thread's send that swallowed an input signal wakes it through this.
        self.receiver: Receiver | None = None
        # Replies that could not be queued (the peer gone, or over its SNDHWM: the socket is ROUTER_MANDATORY).
        self.dropped = 0
        self._warned_at = -math.inf

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.sock.close(0)

    def send(self, frames: list[Any], *, track: bool = False) -> tuple[bool, zmq.MessageTracker | None]:
        """Send now (never blocks: a message for a peer that is gone or over its high-water mark is dropped
        and counted); whether a message is waiting to be received, whose fd signal this send may have
        swallowed, and (``track``) the tracker that tells when libzmq let go of the message."""
        with self.lock:
            if self.closed:
                return False, None
            return self._send(frames, track)

    def send_from_thread(self, frames: list[Any]) -> bool:
        """:meth:`send` from a thread other than the event loop's; False if the socket is closed."""
        with self.lock:
            if self.closed:
                return False
            pending, _ = self._send(frames, False)
        receiver = self.receiver
        if pending and receiver is not None:
            receiver.kick_threadsafe()
        return True

    def _send(self, frames: list[Any], track: bool) -> tuple[bool, zmq.MessageTracker | None]:
        tracker = None
        try:
            sent = self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False, track=track)
            tracker = sent if isinstance(sent, zmq.MessageTracker) else None
        except zmq.ZMQError as exc:
            # Counted, and logged at most once a minute: a client that never reads must not flood the log.
            self.dropped += 1
            now = time.monotonic()
            if now - self._warned_at >= 60.0:
                self._warned_at = now
                log.warning("dropped a reply: %s (%d dropped so far: a peer gone, or not reading its replies)",
                            exc, self.dropped)
        return bool(int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN), tracker


class Receiver:
    """Hands every message of ``sock`` to ``handle`` while :meth:`serve` runs (entered: the fd is watched)."""

    def __init__(self, sock: zmq.Socket[Any], handle: Callable[[list[zmq.Frame]], None],
                 lock: threading.Lock | None = None, after_batch: Callable[[], None] | None = None) -> None:
        self.sock = sock
        self.handle = handle
        # Called after each batch handed over: the rpc server queues a batch, then serves it in fair order.
        self.after_batch = after_batch
        # Held around every use of the socket: log threads send replies on it too (SharedSocket).
        self.lock = lock or threading.Lock()
        self._fd = int(sock.getsockopt(zmq.FD))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        self._draining = False
        self._again: asyncio.Handle | None = None
        self._context = contextvars.Context()

    def __enter__(self) -> Receiver:
        self._loop = asyncio.get_running_loop()
        # Every callback here runs in the rpc loop's context, whoever scheduled it (a log thread's completion
        # sends too): anyio finds its event loop through it when a request starts a task.
        self._context = contextvars.copy_context()
        self._loop.add_reader(self._fd, self._on_signal)  # registered from the rpc loop: its context
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._serving = False
        if self._again is not None:
            self._again.cancel()
            self._again = None
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None

    def readable(self) -> bool:
        """Whether a message can be received now (also clears the fd's signal)."""
        with self.lock:
            return bool(int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def kick_threadsafe(self) -> None:
        """From another thread whose send found a message waiting: handle it on the event loop."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (the daemon is exiting)
                loop.call_soon_threadsafe(self._kicked, context=self._context)

    def _kicked(self) -> None:
        if self._serving and not self._draining and self._again is None:
            self._drain()

    async def serve(self, seconds: float) -> None:
        """Receive and handle messages for ``seconds``: those ready now, then each as it arrives."""
        self._serving = True
        try:
            self._drain()
            await anyio.sleep(seconds)
        finally:
            self._serving = False

    def after_send(self) -> None:
        """Call after every send: a message that slipped in meanwhile is handled (its signal is gone)."""
        # While draining, the drain's next receive finds such a message anyway.
        if self._serving and not self._draining and self._again is None and self.readable():
            self._schedule()

    def _on_signal(self) -> None:
        # Reading EVENTS clears the fd even when the rpc loop is not serving (it is going round): the
        # event loop's reader never spins, and ``serve`` drains what came meanwhile when it starts.
        if self.readable() and self._serving:
            self._drain()

    def _schedule(self) -> None:
        assert self._loop is not None
        self._again = self._loop.call_soon(self._continue, context=self._context)

    def _continue(self) -> None:
        self._again = None
        if self._serving:
            self._drain()

    def _drain(self) -> None:
        self._draining = True
        try:
            for i in range(1, BATCH + 1):
                try:
                    with self.lock:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                try:
                    self.handle(frames)
                except Exception:  # handle answers every error itself; this is a bug, never the loop's end
                    log.exception("unexpected error handling a request")
                if i % MINI_BATCH == 0 and self.after_batch is not None:
                    self.after_batch()
        finally:
            self._draining = False
            if self.after_batch is not None:
                try:
                    self.after_batch()
                except Exception:
                    log.exception("unexpected error serving requests")
        if self._again is None and self.readable():
            self._schedule()  # more waiting: after the other callbacks and tasks have had a turn
