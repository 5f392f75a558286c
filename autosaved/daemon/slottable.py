"""The daemon half of the shared-memory path (see :mod:`autosaved.shm` for who copies when): every slot
the clients handed over, mapped read-only, by fd connection."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import stat
from collections.abc import Awaitable, Callable, Container
from dataclasses import dataclass, field
from typing import Any

from ..shm import NO_SLOT, release_mapping


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
        # Counters kept by add, drop and close (issue 19: a slot request, a restore or a status costs
        # O(itself), never a sum over every client's slots).
        self.mapped_bytes = 0
        self.slot_count = 0
        self._mapped_by_uid: dict[int, int] = {}
        self._live: set[int] = set()  # id() of every mapping a connection has

    def mapped_bytes_of(self, uid: int) -> int:
        """Bytes of slots one user has mapped (``quota.max_shm_bytes``)."""
        return self._mapped_by_uid.get(uid, 0)

    def _count(self, conn: SlotConn, mapping: mmap.mmap, size: int, sign: int) -> None:
        self.mapped_bytes += sign * size
        self.slot_count += sign
        left = self._mapped_by_uid.get(conn.uid, 0) + sign * size
        if left:
            self._mapped_by_uid[conn.uid] = left
        else:
            self._mapped_by_uid.pop(conn.uid, None)
        if sign > 0:
            self._live.add(id(mapping))
        else:
            self._live.discard(id(mapping))

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
            mapping = mmap.mmap(fds[0], size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            conn.slots[slot_id] = mapping
            conn.sizes[slot_id] = size
            self._count(conn, mapping, size, 1)
            return {"ok": True, "slot": slot_id}
        except OSError as exc:
            return {"ok": False, "message": f"cannot map slot: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)  # the mapping keeps the memfd alive

    def drop(self, conn: SlotConn, slot_id: Any) -> None:
        mapping = conn.slots.pop(slot_id, None)
        size = conn.sizes.pop(slot_id, 0)
        if mapping is not None:
            self._count(conn, mapping, size, -1)
            release_mapping(mapping)

    def close(self, conn: SlotConn) -> None:
        """The client is gone: forget its slots. Mappings still referenced by a state stay alive through
        those references and are freed with them."""
        self.conns.pop(conn.token, None)
        for slot_id, mapping in conn.slots.items():
            self._count(conn, mapping, conn.sizes.get(slot_id, 0), -1)
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

    def held_of(self, conn: SlotConn, referenced: Container[int]) -> list[int]:
        """The ids of ``conn``'s slots whose mapping is among ``referenced`` (``id()`` of mappings: the
        ledger's counts, accounting.py). O(the connection's slots).

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
        """``id()`` of every mapping a live connection has (the live set itself: do not change it)."""
        return self._live

    def report(self) -> dict[str, Any]:
        return {"clients": len(self.conns), "slots": self.slot_count,
                "mapped_bytes": self.mapped_bytes, "max_bytes": self.max_bytes, "reclaimed_slots": self.reclaimed}
