"""sd_notify without libsystemd: the protocol is one datagram to ``$NOTIFY_SOCKET`` (a path, or an
abstract socket when it starts with ``@``). Outside systemd ``NOTIFY_SOCKET`` is unset and every call
is a no-op."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import anyio

log = logging.getLogger("autosaved.notify")


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        watchdog = os.environ.get("WATCHDOG_USEC")
        watchdog_pid = os.environ.get("WATCHDOG_PID")
        ours = watchdog_pid is None or watchdog_pid == str(os.getpid())
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval: float | None = (
            int(watchdog) / 1e6 / 2 if watchdog and watchdog.isdigit() and ours else None
        )

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                # Non-blocking: a datagram socket whose reader lags blocks the sender once its queue is
                # full, and this runs on the event loop. A dropped notification is better than a hang.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                           | socket.SOCK_NONBLOCK)
            self._sock.sendto("\n".join(fields).encode(), target)
        except BlockingIOError:
            # The whole message: what was lost is then known (and the tests count it as sent).
            log.warning("sd_notify to %s dropped %r: the receiver is not reading", self.address, "\n".join(fields))
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def watchdog_loop(notifier: Notifier, *, progress_at: Callable[[], float], clock: Callable[[], float],
                        status: Callable[[], str], stale_after: float, status_every: float = 2.0) -> None:
    """Ping the watchdog and report STATUS= while the daemon makes progress.

    This runs as a task on the event loop, never in a thread: a hung loop then stops the pings and
    systemd restarts the daemon. ``progress_at`` is when the rpc loop last went round; once that is
    older than ``stale_after`` the pings stop too, so a loop that runs but no longer serves is caught.
    """
    if not notifier.enabled:
        return
    interval = notifier.watchdog_interval
    tick = min(interval, status_every) if interval is not None else status_every
    last_status = ""
    next_status = 0.0
    while True:
        now = clock()
        if interval is not None:
            if now - progress_at() <= stale_after:
                notifier.watchdog()
            else:
                log.error("the rpc loop made no progress for %.1fs; not pinging the watchdog", now - progress_at())
        if now >= next_status:
            text = status()
            if text != last_status:
                notifier.status(text)
                last_status = text
            next_status = now + status_every
        await anyio.sleep(tick)
