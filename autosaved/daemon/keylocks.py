"""Locks by key that exist only while someone uses them (issue 19, defect 9).

The job table keeps one lock per (owner, job) for loading/deleting and one for saves/gc/verify. Kept
forever, every request naming a job that does not exist (``delete`` of a random name) left a lock
behind: 40,000 such requests grew the daemon by 46 MiB, with no quota applying. Here a key's lock is
dropped as soon as nobody holds it, waits for it or pins it (a loaded job pins its io lock, which it
holds as an attribute), so the table's locks are bounded by the jobs loaded plus the requests in flight.
"""

from __future__ import annotations

from collections import deque
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

    def __contains__(self, key: object) -> bool:
        """Whether anything holds, waits for or pins ``key``'s lock now."""
        return key in self._locks

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


class Turn:
    """A place in a :class:`KeyedTurns` queue, taken at arrival; :meth:`wait` returns when it is first."""

    __slots__ = ("_event", "ready")

    def __init__(self, ready: bool) -> None:
        self.ready = ready
        self._event: anyio.Event | None = None  # made by the waiter, in its task (not at arrival)

    async def wait(self) -> None:
        if not self.ready:
            self._event = anyio.Event()
            await self._event.wait()

    def go(self) -> None:
        self.ready = True
        if self._event is not None:
            self._event.set()


class KeyedTurns(Generic[K]):
    """First come, first served per key, with the place decided synchronously when a request arrives.

    A lock cannot give this: its waiters are woken one event-loop turn after another, and a request that
    arrives meanwhile and finds the lock free (or takes a path with no lock) overtakes the ones not woken
    yet. Here a key stays :meth:`busy` until the last turn taken is done, so every later arrival queues
    behind. Bounded like the locks: a key's queue exists only while turns are taken on it."""

    def __init__(self) -> None:
        self._queues: dict[K, deque[Turn]] = {}

    def __len__(self) -> int:
        return len(self._queues)

    def busy(self, key: K) -> bool:
        return key in self._queues

    def take(self, key: K) -> Turn:
        """A place at the end of ``key``'s queue (call at arrival, before any await)."""
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        turn = Turn(ready=not queue)
        queue.append(turn)
        return turn

    def done(self, key: K, turn: Turn) -> None:
        """``turn`` is over (its request applied, failed or was cancelled): the next one goes."""
        queue = self._queues[key]
        if queue[0] is turn:
            queue.popleft()
            if queue:
                queue[0].go()
        else:
            queue.remove(turn)  # cancelled while waiting (the daemon stopping): rare, O(the queue)
        if not queue:
            del self._queues[key]
