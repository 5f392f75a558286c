"""Shared-memory slots: how bulk leaves reach the daemon at the cost of one memcpy.

Who copies when:

1. ``update()`` copies every leaf of at least :data:`INLINE_MAX` bytes into a *slot* of the client's
   pool: a memfd sized with ``posix_fallocate`` (a full tmpfs or memory cgroup fails here with an
   ``OSError``, never later with SIGBUS), sealed against shrinking, mapped with ``MAP_POPULATE`` and reused
   from update to update, so the copy never page-faults. That copy is the only time the trainer blocks on
   its data; afterwards the caller may mutate its arrays freely. Smaller leaves ride inline in the
   ZeroMQ message, copied by ``send(copy=True)``.
2. The daemon does not copy. It maps each slot once (read-only) when the client hands over the memfd over
   the fd socket (``<socket>.fd``, ``SOCK_SEQPACKET``, ``SCM_RIGHTS``), and the job's state keeps views
   into that mapping. memfds need no shared ``/dev/shm`` or ``/tmp``, so this works under systemd's
   ``PrivateDevices``/``PrivateTmp``, and no resource tracker ever sees them.
3. A slot stays *lent* while any state the daemon holds (a job's live root or a snapshot being written)
   references it. Every update reply lists the client's slots that are still lent; the client writes only
   into the others, and grows its pool (up to :data:`MAX_SLOTS`) when none is free.
4. When a client dies, its fd connection closes: the daemon drops the slot table entries, slots no state
   references are unmapped at once, and the others are freed as soon as the state moves past them (the
   restarted trainer's next full update). The memfd pages live exactly as long as some mapping does.

Any failure on this path (no fd socket, allocation refused, daemon over its ``max_shm_bytes``) makes the
update travel inline, with one logged warning, never an error.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import numpy as np

from .errors import AutosavedError
from .tree import Blob

log = logging.getLogger("autosaved.shm")

# Measured on the development host (32 MiB of leaves, median of 5 updates): 64 KiB leaves were faster
# inline (41 vs 51 ms), 128 KiB on par (28 vs 25 ms), 4 MiB twice as fast through a slot (27 vs 11 ms).
# It is also glibc's mmap threshold: above it every inline copy faults in fresh pages.
INLINE_MAX: Final = 128 * 1024
# Leaves start on page boundaries, so a restore can map each one's pages in one call.
ALIGN: Final = mmap.PAGESIZE
GRANULE: Final = 2 * 1024 * 1024
MAX_SLOTS: Final = 4
NO_SLOT: Final = -1
# After a failure, updates travel inline this many times before the shared-memory path is tried again.
RETRY_AFTER: Final = 32


def fd_socket_path(address: str) -> str | None:
    """The fd socket next to an ``ipc://`` address; ``None`` for tcp (no fd passing there)."""
    if not address.startswith("ipc://"):
        return None
    return address.removeprefix("ipc://") + ".fd"


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


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

    def place(self, blobs: Sequence[Blob]) -> Placement | None:
        """Copy the bulk blobs into a free slot and say where (the caller's arrays are then free
        again); ``None`` sends everything inline."""
        if fd_socket_path(self.address) is None:
            return None  # tcp: no fd passing, everything inline
        if self.disabled_reason is not None:
            self._retry_in -= 1
            if self._retry_in > 0:
                return None
            self.disabled_reason = None  # memory may have come free since: try again
        refs, total = layout(blobs)
        if not refs:
            return self._inline()
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
            return self._inline()
        for i, off in refs:
            src = blobs[i].data
            assert src is not None
            np.copyto(slot.array[off : off + src.nbytes], np.frombuffer(src, dtype=np.uint8))
        self.lent.add(slot.id)
        assert self.token is not None
        return Placement(self.token, slot.id, refs)

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

    def _inline(self) -> Placement | None:
        # Even an all-inline update names our connection, so the reply tells which slots came free.
        return Placement(self.token, NO_SLOT, []) if self.token is not None else None

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
        return self._new_slot(_round_up(max(size, GRANULE), GRANULE))

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


# -- daemon side ---------------------------------------------------------------------------------


@dataclass
class SlotConn:
    token: str
    uid: int
    pid: int
    slots: dict[int, mmap.mmap] = field(default_factory=dict)
    sizes: dict[int, int] = field(default_factory=dict)
    held: set[int] = field(default_factory=set)
    # Sends a message with fds to this client (set by the daemon's connection task).
    send_fds: Callable[[bytes, list[int]], Awaitable[None]] | None = None


class SlotTable:
    """Every mapped slot, by fd connection. Lives in the daemon's event loop (no locking needed)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.conns: dict[str, SlotConn] = {}
        self.reclaimed = 0

    @property
    def mapped_bytes(self) -> int:
        return sum(sum(c.sizes.values()) for c in self.conns.values())

    def mapped_bytes_of(self, uid: int) -> int:
        """Bytes of slots one user has mapped (``quota.max_shm_bytes``)."""
        return sum(sum(c.sizes.values()) for c in self.conns.values() if c.uid == uid)

    def open(self, uid: int, pid: int) -> SlotConn:
        conn = SlotConn(secrets.token_hex(16), uid, pid)
        self.conns[conn.token] = conn
        return conn

    def add(self, conn: SlotConn, slot_id: Any, size: Any, fds: list[int]) -> dict[str, Any]:
        """Map a slot the client sent; a refusal closes the fd and says why."""
        try:
            if len(fds) != 1:
                return {"ok": False, "message": f"expected one fd, got {len(fds)}"}
            if not isinstance(slot_id, int) or not isinstance(size, int) or size <= 0 or slot_id in conn.slots:
                return {"ok": False, "message": "bad slot id or size"}
            st = os.fstat(fds[0])
            if not stat.S_ISREG(st.st_mode) or st.st_size < size:
                return {"ok": False, "message": "slot fd is not a memfd of the announced size"}
            seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
            if not seals & fcntl.F_SEAL_SHRINK:
                # An unsealed memfd could be truncated under our mapping, and reading it would SIGBUS us.
                return {"ok": False, "message": "slot memfd is not sealed against shrinking"}
            if self.mapped_bytes + size > self.max_bytes:
                return {"ok": False, "message": f"the daemon's max_shm_bytes ({self.max_bytes}) would be exceeded"}
            conn.slots[slot_id] = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            conn.sizes[slot_id] = size
            return {"ok": True, "slot": slot_id}
        except OSError as exc:
            return {"ok": False, "message": f"cannot map slot: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)  # the mapping keeps the memfd alive

    def drop(self, conn: SlotConn, slot_id: Any) -> None:
        mapping = conn.slots.pop(slot_id, None)
        conn.sizes.pop(slot_id, None)
        if mapping is not None:
            release_mapping(mapping)

    def close(self, conn: SlotConn) -> None:
        """The client is gone: forget its slots. Mappings still referenced by a state stay alive through
        those references and are freed with them."""
        self.conns.pop(conn.token, None)
        for mapping in conn.slots.values():
            release_mapping(mapping)
        self.reclaimed += len(conn.slots)
        conn.slots.clear()
        conn.sizes.clear()

    def views(self, uid: int, wire: Any, descs_count: int) -> tuple[SlotConn, dict[int, memoryview]]:
        """Resolve an update's ``shm`` field into blob index → view; ``LookupError``/``ValueError`` name
        what is wrong."""
        if not isinstance(wire, dict):
            raise ValueError("shm must be a map")
        token, slot_id, refs = wire.get("conn"), wire.get("slot"), wire.get("refs")
        conn = self.conns.get(token) if isinstance(token, str) else None
        if conn is None or conn.uid != uid:
            raise LookupError("unknown shared-memory connection (the daemon may have restarted)")
        if not isinstance(refs, list):
            raise ValueError("shm refs must be a list")
        if slot_id == NO_SLOT and not refs:
            return conn, {}
        mapping = conn.slots.get(slot_id) if isinstance(slot_id, int) else None
        if mapping is None:
            raise LookupError(f"unknown slot {slot_id!r}")
        out: dict[int, memoryview] = {}
        for ref in refs:
            if (not isinstance(ref, list) or len(ref) != 2 or not all(type(x) is int for x in ref)
                    or not 0 <= ref[0] < descs_count or ref[0] in out or ref[1] < 0):
                raise ValueError(f"bad shm ref {ref!r}")
            out[ref[0]] = memoryview(mapping)[ref[1] :]  # trimmed to the blob's size by the caller
        return conn, out

    def held_of(self, conn: SlotConn, referenced: set[int]) -> list[int]:
        """The ids of ``conn``'s slots whose mapping is among ``referenced`` (``id()`` of mappings).

        The others go back to the client; their pages leave the daemon's page tables too (a save read
        them), so the daemon's RSS counts only slots a state still uses."""
        held = []
        for sid, mapping in conn.slots.items():
            if id(mapping) in referenced:
                held.append(sid)
            elif sid in conn.held:  # just released: once per release, not on every update
                with contextlib.suppress(OSError, ValueError):
                    mapping.madvise(mmap.MADV_DONTNEED)
        conn.held = set(held)
        return held

    def live_mappings(self) -> set[int]:
        return {id(m) for c in self.conns.values() for m in c.slots.values()}

    def report(self) -> dict[str, Any]:
        return {"clients": len(self.conns), "slots": sum(len(c.slots) for c in self.conns.values()),
                "mapped_bytes": self.mapped_bytes, "max_bytes": self.max_bytes, "reclaimed_slots": self.reclaimed}


def layout(blobs: Sequence[Blob]) -> tuple[list[tuple[int, int]], int]:
    """Where the bulk blobs go in one buffer: (blob index, offset) pairs and the buffer's size."""
    refs, total = [], 0
    for i, blob in enumerate(blobs):
        if blob.nbytes >= INLINE_MAX:
            refs.append((i, total))
            total = _round_up(total + blob.nbytes, ALIGN)
    return refs, total


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


def release_mapping(mapping: mmap.mmap) -> None:
    # A view still alive (a state or snapshot in the daemon) keeps the mapping; it goes with the last view.
    with contextlib.suppress(BufferError):
        mapping.close()


def referenced_mappings(blobs: Iterable[Blob]) -> set[int]:
    """``id()`` of every mapping the blobs' data lives in (a view's ``obj`` is what it was sliced from)."""
    out: set[int] = set()
    for blob in blobs:
        if blob.data is not None and isinstance(blob.data.obj, mmap.mmap):
            out.add(id(blob.data.obj))
    return out
