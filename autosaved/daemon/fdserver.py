"""The fd server: accepts clients' memfds on ``<socket>.fd`` (``SOCK_SEQPACKET``, ``SCM_RIGHTS``; see
:mod:`autosaved.shm`). One connection per client, whose end reclaims its slots; restores hand buffers
back through the same connection. It gets a narrow context, never the daemon."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import msgpack

from ..errors import AutosavedError, QuotaExceeded
from ..storage.faults import point
from .accept import serve_capped
from .replybudget import over_budget, unread_bytes
from .runstate import RunState
from .slottable import SlotTable

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("autosaved.daemon")


@dataclass(frozen=True)
class FdContext:
    config: Callable[[], Config]
    slots: SlotTable
    boot: str
    run: RunState
    # Gives a socket file to the clients' group, if one is configured (AutosavedError when it cannot).
    give_to_socket_group: Callable[[Path], None]
    # Connections open at once, all users together (max_connections fitted to the fd limit).
    max_conns: Callable[[], int]
    # Bytes of ZeroMQ replies a user has queued and not read (quota.max_reply_bytes covers both).
    replies_held: Callable[[int], int]


class FdServer:
    def __init__(self, ctx: FdContext) -> None:
        self.ctx = ctx
        # Open connections per uid, for quota.max_connections.
        self.by_uid: dict[int, int] = {}
        self.refused = 0
        # Restore memfds sent and not yet read, per uid (see replybudget.py).
        self._restore_bytes: dict[int, int] = {}
        # Per uid, each open connection's settle(): it gives back what its client has read since. A budget
        # check settles first: charges were given back only at the connection's next send, so one restore
        # read long ago kept a user's next restore over quota.max_reply_bytes (every second restore of a
        # state the size of the quota failed).
        self._settlers: dict[int, set[Callable[[], None]]] = {}

    def restore_bytes(self, uid: int | None) -> int:
        """Bytes of restore buffers ``uid`` (None: everyone) was sent and has not read. O(the user's
        connections, at most quota.max_connections) for one uid."""
        for settle in list(self._settlers.get(uid, ()) if uid is not None else
                           (s for group in self._settlers.values() for s in group)):
            settle()
        return sum(self._restore_bytes.values()) if uid is None else self._restore_bytes.get(uid, 0)

    def _charge(self, uid: int, delta: int) -> None:
        left = self._restore_bytes.get(uid, 0) + delta
        if left > 0:
            self._restore_bytes[uid] = left
        else:
            self._restore_bytes.pop(uid, None)

    async def run(self, path: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept clients' memfds (see :mod:`autosaved.shm`); one connection per client, whose end
        reclaims its slots."""
        # A socket left by a crashed daemon: we hold the socket lock, so no live daemon uses it.
        try:
            if os.path.exists(path):
                os.unlink(path)
            listener = await anyio.create_unix_listener(path, mode=0o660, kind=socket.SOCK_SEQPACKET)
            self.ctx.give_to_socket_group(Path(path))  # the same group that may reach the ipc socket
        except (OSError, AutosavedError) as exc:
            # Clients then send everything inline: slower for big states, but nothing breaks.
            log.warning("cannot listen on %s (%s); shared-memory transfers are off", path, exc)
            task_status.started()
            return
        task_status.started()
        try:
            while True:
                try:
                    await serve_capped(listener, self._conn, max_conns=self.ctx.max_conns(),
                                       name=f"fd socket {path}")
                except Exception:  # the listener itself broke: log, pause, accept again
                    log.exception("fd socket %s: accept loop failed; restarting it", path)
                    self.ctx.run.task_failures += 1
                    await anyio.sleep(1.0)
        finally:
            await listener.aclose()
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _conn(self, stream: Any) -> None:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        pid, uid, _gid = struct.unpack("3i", raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        cap = self.ctx.config().quota.max_connections
        if self.by_uid.get(uid, 0) >= cap:
            self.refused += 1
            message = (f"quota.max_connections: uid {uid} has {self.by_uid[uid]} connections open on the fd socket "
                       f"(the limit is {cap})")
            log.warning("refused a slot connection pid=%d: %s", pid, message)
            with contextlib.suppress(Exception):
                async with stream:
                    with anyio.move_on_after(1):
                        await stream.send(msgpack.packb({"ok": False, "code": "quota", "message": message}))
            return
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1
        try:
            await self._serve_conn(stream, pid, uid)
        finally:
            left = self.by_uid[uid] - 1
            if left:
                self.by_uid[uid] = left
            else:
                del self.by_uid[uid]

    async def _serve_conn(self, stream: Any, pid: int, uid: int) -> None:
        conn = self.ctx.slots.open(uid, pid)
        log.debug("slot connection opened pid=%d uid=%d", pid, uid)
        send_lock = anyio.Lock()
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        unread = [0]  # restore bytes sent on this connection since its send queue was last seen empty

        def settle() -> None:
            if unread[0] and unread_bytes(raw) == 0:  # the client read everything sent so far
                self._charge(uid, -unread[0])
                unread[0] = 0

        async def send_fds(msg: bytes, fds: list[int]) -> None:
            async with send_lock:  # replies here and restore buffers from request handlers share the stream
                settle()
                size = sum(os.fstat(fd).st_size for fd in fds)
                held = self.restore_bytes(uid) + self.ctx.replies_held(uid)
                why = over_budget(uid, held, size, self.ctx.config().quota.max_reply_bytes)
                if why is not None:
                    raise QuotaExceeded(why, details={"quota": "max_reply_bytes", "used": held})
                await stream.send_fds(msg, fds)
                unread[0] += size
                self._charge(uid, size)

        async def send(msg: bytes) -> None:
            async with send_lock:
                await stream.send(msg)

        conn.send_fds = send_fds
        self._settlers.setdefault(uid, set()).add(settle)
        try:
            async with stream:
                await send(msgpack.packb({"token": conn.token, "boot": self.ctx.boot}))
                while True:
                    msg, fds = await stream.receive_fds(4096, 4)
                    if not msg:
                        for fd in fds:
                            os.close(fd)
                        break
                    reply = self._request(conn, msg, fds)
                    if not reply["ok"]:
                        log.warning("refused a shared-memory slot request pid=%d: %s", pid, reply["message"])
                    await send(msgpack.packb(reply))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug: this connection ends (its slots reclaimed), the daemon serves on
            log.exception("slot connection pid=%d failed; closing it", pid)
        finally:
            log.info("slot connection closed pid=%d: reclaiming %d slots", pid, len(conn.slots))
            self._charge(uid, -unread[0])
            group = self._settlers.get(uid)
            if group is not None:
                group.discard(settle)
                if not group:
                    del self._settlers[uid]
            self.ctx.slots.close(conn)

    def _request(self, conn: Any, msg: bytes, fds: list[int]) -> dict[str, Any]:
        """One request on the fd socket; every field checked here, every fd closed or kept by a slot."""
        try:
            point("task", "fd", "before", conn.pid)
            try:
                req = msgpack.unpackb(msg, strict_map_key=False)
            except Exception:
                req = None
            op = req.get("op") if isinstance(req, dict) else None
            slot = req.get("slot") if isinstance(req, dict) else None
            if op == "add":
                uid_limit = self.ctx.config().quota.max_shm_bytes
                size = req.get("size") if isinstance(req, dict) else None
                if (uid_limit is not None and isinstance(size, int)
                        and self.ctx.slots.mapped_bytes_of(conn.uid) + size > uid_limit):
                    for fd in fds:
                        os.close(fd)
                    fds = []
                    return {"ok": False, "message": f"quota.max_shm_bytes: uid {conn.uid} would map more than "
                                                    f"{uid_limit} bytes of slots"}
                taken, fds = fds, []  # add closes them, whatever happens
                reply: dict[str, Any] = self.ctx.slots.add(conn, slot, size, taken)
                return reply
            if op == "drop":
                if not isinstance(slot, int) or isinstance(slot, bool):
                    return {"ok": False, "message": "drop needs a slot id (an integer)"}
                self.ctx.slots.drop(conn, slot)
                return {"ok": True}
            return {"ok": False, "message": "unknown slot request"}
        except Exception as exc:
            log.exception("slot request failed")
            return {"ok": False, "message": f"internal error: {exc!r}"}
        finally:
            for fd in fds:
                os.close(fd)
