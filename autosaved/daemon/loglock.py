"""The lock of a job's write-ahead log."""

from __future__ import annotations

from collections import deque
from types import TracebackType

import anyio


class LogLock:
    """Held by a log append (write + fdatasync) and by whatever rotates, drops or deletes the log's
    segments. Unlike ``anyio.Lock`` it has no owning task, so the rpc loop's fd callback can take it with
    :meth:`try_acquire` and start the append of an idle log at once, and the append's completion callback
    releases it (perf, issue 14: a task per batch and the lock's checkpoint cost a ``logged`` update two
    more rounds of the event loop). Fair: a release hands the lock to the oldest waiter."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[anyio.Event] = deque()

    def locked(self) -> bool:
        return self._held

    def try_acquire(self) -> bool:
        if self._held or self._waiters:
            return False
        self._held = True
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        handed = anyio.Event()
        self._waiters.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():
                self.release()  # it was handed to us as we were cancelled: pass it on
            else:
                self._waiters.remove(handed)
            raise

    def release(self) -> None:
        assert self._held, "release of a log lock that is not held"
        if self._waiters:
            self._waiters.popleft().set()  # held on behalf of the next waiter: never free in between
        else:
            self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()
