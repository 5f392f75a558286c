"""The client half of the shared-memory path (see :mod:`autosaved.shm` for who copies when): the slot
pool a trainer copies its bulk leaves into, and its fd connection to the daemon. Blocking I/O, short and
local; the client core asks its drivers to run it (the async one in a worker thread)."""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np

from ..errors import AutosavedError
from ..shm import NO_SLOT, fd_socket_path, layout, release_mapping, round_up
from ..tree import Blob
from .slotcopy import copy_waited

log = logging.getLogger("autosaved.shm")

GRANULE: Final = 2 * 1024 * 1024
MAX_SLOTS: Final = 4
# After a failure, updates travel inline this many times before the shared-memory path is tried again.
RETRY_AFTER: Final = 32


def create_memfd(size: int) -> tuple[int, mmap.mmap]:
    """A sealed, fully allocated, pre-faulted shared mapping of ``size`` bytes; ``OSError`` when the
    memory is not there (ENOSPC, ENOMEM, EFBIG under RLIMIT_FSIZE)."""
    fd = os.memfd_create("autosaved-slot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.posix_fallocate(fd, 0, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mapping


@dataclass
class Slot:
    id: int
    fd: int
    size: int
    mapping: mmap.mmap
    array: np.ndarray[Any, np.dtype[np.uint8]]

    def close(self) -> None:
        self.array = np.empty(0, dtype=np.uint8)  # our own view would keep the mapping open
        release_mapping(self.mapping)
        os.close(self.fd)


@dataclass(frozen=True)
class Placement:
    """Where an update's bulk leaves went: blob index → offset in slot ``slot`` of connection ``conn``."""

    conn: str
    slot: int
    refs: list[tuple[int, int]]

    def to_wire(self) -> dict[str, Any]:
        return {"conn": self.conn, "slot": self.slot, "refs": [list(r) for r in self.refs]}


# Copies (destination, source) byte arrays of equal length.
Copier = Callable[[list[tuple[np.ndarray, np.ndarray]]], None]


@dataclass
class SlotPool:
    """The client's slots and its fd connection to the daemon. Blocking I/O, short and local; used by
    both drivers (the async one calls it from a worker thread)."""

    address: str
    timeout: float = 10.0
    max_slots: int = MAX_SLOTS
    conn: socket.socket | None = None
    token: str | None = None
    boot: str | None = None
    slots: dict[int, Slot] = field(default_factory=dict)
    lent: set[int] = field(default_factory=set)
    disabled_reason: str | None = None
    _next_id: int = 1
    _retry_in: int = 0

    def place(self, blobs: Sequence[Blob], copy: Copier | None = None) -> Placement | None:
        """Copy the bulk blobs into a free slot and say where (the caller's arrays are then free
        again); ``None`` sends everything inline. ``copy``: who copies the (slot, source) pairs (the
        lazy client shares the copy with a fencing caller); by default, this thread and the helpers
        (:func:`~autosaved.client.slotcopy.copy_waited`), here."""
        if fd_socket_path(self.address) is None:
            return None  # tcp: no fd passing, everything inline
        if self.disabled_reason is not None:
            self._retry_in -= 1
            if self._retry_in > 0:
                return None
            self.disabled_reason = None  # memory may have come free since: try again
        refs, total = layout(blobs)
        if not refs:
            return self.inline_placement()
        try:
            try:
                slot = self._free_slot(total)
            except ConnectionError:
                self.reset()  # the daemon we talked to is gone; a new one may be listening
                slot = self._free_slot(total)
        except (OSError, SlotRefused) as exc:
            self._fallback(str(exc))
            return None
        if slot is None:
            log.warning("all %d shared-memory slots are still held by the daemon; this update travels inline",
                        len(self.slots))
            return self.inline_placement()
        pairs = []
        for i, off in refs:
            src = blobs[i].data
            assert src is not None
            pairs.append((slot.array[off : off + src.nbytes], np.frombuffer(src, dtype=np.uint8)))
        (copy or copy_waited)(pairs)
        self.lent.add(slot.id)
        assert self.token is not None
        return Placement(self.token, slot.id, refs)

    def known_restore_conn(self) -> tuple[bool, str | None]:
        """(True, what :meth:`restore_conn` would return) when that needs no I/O: connected already, or
        the shared-memory path is off (disabled, or a tcp address); (False, None) when it must connect."""
        if self.disabled_reason is not None or fd_socket_path(self.address) is None:
            return True, None
        if self.conn is not None:
            return True, self.token
        return False, None

    def restore_conn(self) -> str | None:
        """Our connection's token, so the daemon can hand a restore over as a memfd; ``None``: inline."""
        if self.disabled_reason is not None:
            return None
        try:
            self._ensure_conn()
        except (OSError, SlotRefused, ValueError, KeyError):
            self.reset()
            return None
        return self.token

    def receive(self, wire: Any) -> dict[int, memoryview]:
        """The memfd a restore reply announced (it was sent before the reply), as blob index → view."""
        if self.conn is None:
            raise AutosavedError("no fd connection to receive the restore buffer on")
        msg, fds, _flags, _addr = socket.recv_fds(self.conn, 4096, 1)
        info = msgpack.unpackb(msg) if msg else {}
        if len(fds) != 1 or info.get("seq") != wire.get("seq"):
            for fd in fds:
                os.close(fd)
            self.reset()
            raise AutosavedError("the daemon's restore buffer did not arrive")
        mapping = map_received(fds[0], int(wire["size"]))
        view = memoryview(mapping)
        return {int(i): view[int(off) :] for i, off in wire["refs"]}

    def inline_placement(self) -> Placement | None:
        # An all-inline update names our connection while slots are lent, so the reply tells which came
        # free. With none lent there is nothing to learn, and naming it would make the daemon walk every
        # leaf of every job to answer (O(daemon state) per small update: a LangGraph put).
        return Placement(self.token, NO_SLOT, []) if self.token is not None and self.lent else None

    def settle(self, held: Iterable[int] | None) -> None:
        """Learn from an update reply which of our slots the daemon still references."""
        if held is not None:
            self.lent = {int(s) for s in held} & set(self.slots)

    def _fallback(self, why: str) -> None:
        log.warning("shared-memory path unavailable (%s); sending large leaves inline for the next %d updates",
                    why, RETRY_AFTER)
        self.disabled_reason = why
        self._retry_in = RETRY_AFTER
        self.reset()

    def _free_slot(self, size: int) -> Slot | None:
        self._ensure_conn()
        free = [s for s in self.slots.values() if s.id not in self.lent and s.size >= size]
        if free:
            return min(free, key=lambda s: s.size)
        idle = [s for s in self.slots.values() if s.id not in self.lent]
        if len(self.slots) >= self.max_slots:
            if not idle:
                return None
            self._drop(min(idle, key=lambda s: s.size))  # too small for this update: replace it
        return self._new_slot(round_up(max(size, GRANULE), GRANULE))

    def _new_slot(self, size: int) -> Slot:
        fd, mapping = create_memfd(size)
        slot = Slot(self._next_id, fd, size, mapping, np.frombuffer(mapping, dtype=np.uint8))
        self._next_id += 1
        try:
            reply = self._request({"op": "add", "slot": slot.id, "size": size}, [fd])
        except BaseException:
            slot.close()
            raise
        if not reply.get("ok"):
            slot.close()
            raise SlotRefused(str(reply.get("message", "refused")))
        self.slots[slot.id] = slot
        return slot

    def _drop(self, slot: Slot) -> None:
        self.slots.pop(slot.id, None)
        try:
            self._request({"op": "drop", "slot": slot.id}, [])
        finally:
            slot.close()

    def _ensure_conn(self) -> None:
        if self.conn is not None:
            return
        path = fd_socket_path(self.address)
        if path is None:
            raise SlotRefused(f"{self.address} is not an ipc address")
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.settimeout(self.timeout)
        try:
            conn.connect(path)
            hello = msgpack.unpackb(conn.recv(4096))
        except BaseException:
            conn.close()
            raise
        if not isinstance(hello, dict) or "token" not in hello:  # refused (quota.max_connections): inline then
            conn.close()
            raise SlotRefused(str(hello.get("message", "refused")) if isinstance(hello, dict) else "refused")
        self.conn, self.token, self.boot = conn, str(hello["token"]), str(hello["boot"])

    def _request(self, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        assert self.conn is not None
        socket.send_fds(self.conn, [msgpack.packb(msg)], fds)
        raw = self.conn.recv(4096)
        if not raw:
            raise ConnectionResetError("the daemon closed the fd socket")
        reply: dict[str, Any] = msgpack.unpackb(raw)
        return reply

    def reset(self) -> None:
        """Forget the connection and every slot (after a daemon restart, a timeout, or on close)."""
        for slot in self.slots.values():
            slot.close()
        self.slots.clear()
        self.lent.clear()
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.token = None

    def retry_now(self) -> None:
        """Allow the shared-memory path again (the daemon we fell back from has been replaced)."""
        self.disabled_reason = None
        self._retry_in = 0


class SlotRefused(Exception):
    """The daemon did not take a slot (over its budget, or the memfd did not check out)."""


def map_received(fd: int, size: int) -> mmap.mmap:
    """Map a memfd the daemon filled for a restore. Shared, not private: a private writable mapping would
    copy every page when populated, and nobody else writes this memfd any more."""
    try:
        st = os.fstat(fd)
        if st.st_size < size:
            raise OSError(f"restore buffer is {st.st_size} bytes, expected {size}")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    finally:
        os.close(fd)

