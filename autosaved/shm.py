"""Shared-memory slots: how bulk leaves reach the daemon at the cost of one memcpy.

This module holds what both halves agree on (sizes, the wire layout, the fd socket's path); the client's
slot pool is :mod:`autosaved.client.slots`, the daemon's table of mapped slots
:mod:`autosaved.daemon.slottable`.

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
import mmap
from collections.abc import Sequence
from typing import Final

from .tree import Blob

# Measured on the development host (32 MiB of leaves, median of 5 updates): 64 KiB leaves were faster
# inline (41 vs 51 ms), 128 KiB on par (28 vs 25 ms), 4 MiB twice as fast through a slot (27 vs 11 ms).
# It is also glibc's mmap threshold: above it every inline copy faults in fresh pages.
INLINE_MAX: Final = 128 * 1024
# Leaves start on page boundaries, so a restore can map each one's pages in one call.
ALIGN: Final = mmap.PAGESIZE
NO_SLOT: Final = -1


def fd_socket_path(address: str) -> str | None:
    """The fd socket next to an ``ipc://`` address; ``None`` for tcp (no fd passing there)."""
    if not address.startswith("ipc://"):
        return None
    return address.removeprefix("ipc://") + ".fd"


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def layout(blobs: Sequence[Blob]) -> tuple[list[tuple[int, int]], int]:
    """Where the bulk blobs go in one buffer: (blob index, offset) pairs and the buffer's size."""
    refs, total = [], 0
    for i, blob in enumerate(blobs):
        if blob.nbytes >= INLINE_MAX:
            refs.append((i, total))
            total = round_up(total + blob.nbytes, ALIGN)
    return refs, total


def release_mapping(mapping: mmap.mmap) -> None:
    # A view still alive (a state or snapshot in the daemon) keeps the mapping; it goes with the last view.
    with contextlib.suppress(BufferError):
        mapping.close()

