"""What the daemon holds for a user who does not read its replies (issue 19, defect 3).

A ROUTER queues a reply in libzmq until the peer reads it; a restore through the fd socket hands over a
memfd whose pages stay pinned while its message sits unread in the socket. 120 restores of an 8 MiB
version on a DEALER that never reads took the daemon from 60 MiB to 1 GiB. So every reply of at least
``TRACK_MIN`` bytes is charged to its user until libzmq lets go of it (a ``MessageTracker``), and every
restore memfd until the fd connection's send queue is empty (``SIOCOUTQ``: the peer read everything);
the sum per user is bounded by ``quota.max_reply_bytes``. A reply over it is replaced by a ``quota``
error (small); a restore memfd over it fails the restore with that error. Smaller replies are bounded
in number by the per-peer send high-water mark (``SNDHWM``) and the connections per user.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import zmq

# Replies this big are tracked (a tracker costs a few microseconds; small replies are bounded by count).
TRACK_MIN = 64 * 1024
# Messages queued per peer (libzmq's default is 1000): past it a reply is dropped and counted.
SEND_HWM = 512


def unread_bytes(sock: Any) -> int:
    """Bytes the peer of a unix socket has not read yet (``SIOCOUTQ``); 0 when it cannot be told."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except (OSError, ValueError):
        return 0
    return int(struct.unpack("i", raw)[0])


class ReplyBudget:
    """Bytes of tracked ZeroMQ replies each user has queued and not yet read."""

    def __init__(self) -> None:
        self._pending: dict[int, list[tuple[zmq.MessageTracker, int]]] = {}
        # Bytes of replies being built (read from disk, copied into a memfd), per user.
        self.building: dict[int, int] = {}
        self.dropped = 0  # replies dropped: over the budget, or over a peer's high-water mark
        self.refused = 0  # requests refused before their reply was built

    def held(self, uid: int) -> int:
        """Bytes of ``uid``'s replies being built or queued."""
        return self.queued(uid)[0] + self.building.get(uid, 0)

    @contextmanager
    def building_reply(self, uid: int, size: int) -> Iterator[None]:
        self.building[uid] = self.building.get(uid, 0) + size
        try:
            yield
        finally:
            left = self.building[uid] - size
            if left:
                self.building[uid] = left
            else:
                del self.building[uid]

    def queued(self, uid: int) -> tuple[int, int]:
        """(bytes, replies) the user still has queued (done trackers are forgotten here)."""
        entries = self._pending.get(uid)
        if not entries:
            return 0, 0
        live = [(t, n) for t, n in entries if not t.done]
        if live:
            self._pending[uid] = live
        else:
            del self._pending[uid]
        return sum(n for _, n in live), len(live)

    def add(self, uid: int, tracker: zmq.MessageTracker, size: int) -> None:
        self._pending.setdefault(uid, []).append((tracker, size))

    def sweep(self) -> None:
        """Forget every finished reply (the rpc loop calls it once a round: users who went quiet)."""
        for uid in list(self._pending):
            self.queued(uid)

    def total(self) -> int:
        return sum(n for entries in self._pending.values() for t, n in entries if not t.done) \
            + sum(self.building.values())


def over_budget(uid: int, held: int, size: int, limit: int | None) -> str | None:
    """Why a reply of ``size`` bytes to ``uid``, who holds ``held`` unread, must not be queued (pure)."""
    if limit is None or held + size <= limit or held == 0:
        # One reply alone may be as big as a message may be: the budget bounds what piles up behind it.
        return None
    return (f"quota.max_reply_bytes: uid {uid} has {held} bytes of replies not yet read; a reply of {size} bytes "
            f"would pass the limit of {limit} (read your replies, or wait for them)")
