"""A supervised accept loop for the daemon's stream listeners (the fd socket and the metrics port).

anyio's ``Listener.serve`` ends at the first error ``accept()`` raises, and with it the task group: one
``EMFILE`` (any local user can open enough idle connections to hit the daemon's fd limit) would take the
daemon down with every job. Here:

- ``accept()`` failing for lack of resources (``EMFILE``, ``ENFILE``, ``ENOBUFS``, ``ENOMEM``) or for a
  connection the peer already gave up (``ECONNABORTED``...) backs off and tries again; serving goes on;
- at most ``max_conns`` connections are open at once: past that, the listener stops accepting (the
  kernel's backlog holds the rest) until one closes, so one user's idle connections cannot take every fd;
- a handler's failure closes that connection only, with the error in the log.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc

log = logging.getLogger("autosaved.daemon")

# Errors of one accept() call, not of the listener: back off and accept again.
RETRY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED,
                          errno.EPROTO, errno.EPERM, errno.EINTR, errno.EAGAIN})
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0


async def serve_capped(listener: anyio.abc.Listener[Any], handler: Callable[[Any], Awaitable[None]], *,
                       max_conns: int, name: str) -> None:
    """Accept connections on ``listener`` and run ``handler`` for each, forever (until cancelled)."""
    slots = anyio.Semaphore(max_conns)

    async def run(stream: Any) -> None:
        try:
            await handler(stream)
        except Exception:
            log.exception("%s connection failed; closing it", name)
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await stream.aclose()
        finally:
            slots.release()

    async def accept_loop(one: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup) -> None:
        backoff = BACKOFF_MIN_S
        warned = False
        while True:
            if slots.value == 0 and not warned:
                log.warning("%s: %d connections open, the limit; new ones wait", name, max_conns)
                warned = True
            await slots.acquire()
            try:
                stream = await one.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                slots.release()
                # anyio's unix listener wraps the OSError in BrokenResourceError; its tcp one does not.
                cause = exc if isinstance(exc, OSError) else exc.__cause__
                if not isinstance(cause, OSError) or cause.errno not in RETRY_ERRNOS:
                    raise
                log.warning("%s: accept failed (%s); retrying in %.2fs", name, cause.strerror or cause, backoff)
                await anyio.sleep(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            backoff = BACKOFF_MIN_S
            warned = warned and slots.value == 0
            tg.start_soon(run, stream)

    # create_tcp_listener gives a MultiListener (one socket per address family) over socket listeners.
    listeners: list[anyio.abc.SocketListener] = list(getattr(listener, "listeners", [listener]))
    async with anyio.create_task_group() as tg:
        for one in listeners:
            tg.start_soon(accept_loop, one, tg)
