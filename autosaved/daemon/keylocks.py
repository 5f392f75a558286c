"""Locks by key that exist only while someone uses them (issue 19, defect 9).

The job table keeps one lock per (owner, job) for loading/deleting and one for saves/gc/verify. Kept
forever, every request naming a job that does not exist (``delete`` of a random name) left a lock
behind: 40,000 such requests grew the daemon by 46 MiB, with no quota applying. Here a key's lock is
dropped as soon as nobody holds it, waits for it or pins it (a loaded job pins its io lock, which it
holds as an attribute), so the table's locks are bounded by the jobs loaded plus the requests in flight.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import anyio

K = TypeVar("K")


class KeyedLocks(Generic[K]):
    def __init__(self) -> None:
        # key -> (its lock, how many holders, waiters and pins use it now)
        self._locks: dict[K, tuple[anyio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def pin(self, key: K) -> anyio.Lock:
        """The key's lock, kept until :meth:`unpin` (a loaded job holds its io lock this way)."""
        lock, users = self._locks.get(key) or (anyio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        return lock

    def unpin(self, key: K) -> None:
        entry = self._locks.get(key)
        if entry is None:
            return
        lock, users = entry
        if users > 1:
            self._locks[key] = (lock, users - 1)
        else:
            del self._locks[key]

    @asynccontextmanager
    async def hold(self, key: K) -> AsyncIterator[None]:
        """Hold the key's lock (waiting for it); the lock is forgotten when its last user is done."""
        lock = self.pin(key)
        try:
            async with lock:
                yield
        finally:
            self.unpin(key)
