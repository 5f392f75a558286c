"""Who is served next (issue 19): deficit round robin over one FIFO queue per user, weighted by what each
request costs (its bytes), in place of the order requests happened to arrive in.

The rpc loop receives a batch of requests, queues each under its sender, and serves them in this order: a
user who sends few cheap requests is served within one round, however many or however big the requests
another user queued ahead of them (a round gives every user with work ``quantum`` bytes of credit; a
request is served once its user's credit covers it). One user's requests keep their order (a FIFO each),
so one client's updates to one job are applied in the order it sent them.

A user can be *held*: their queue is kept but not served (the rpc loop holds a user while one of their
requests is being decoded in a worker thread, so that their later requests cannot overtake it).

Pure: no I/O and no clock; O(1) per push and amortised O(1 + cost / quantum) per pop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# Credit per round: a small request (a few KiB) is served in its first round; a 1 MiB one waits 16 rounds,
# in which every other user with work queued is served up to 64 KiB.
QUANTUM = 64 * 1024


class FairQueue(Generic[T]):
    def __init__(self, quantum: int = QUANTUM) -> None:
        if quantum <= 0:
            raise ValueError("quantum must be positive")
        self.quantum = quantum
        self._queues: dict[int, deque[tuple[int, T]]] = {}
        self._deficit: dict[int, int] = {}
        # Users with work queued and not held, in round order (a user is here at most once).
        self._active: deque[int] = deque()
        self._held: dict[int, int] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def queued(self, user: int) -> int:
        q = self._queues.get(user)
        return len(q) if q is not None else 0

    def push(self, user: int, item: T, cost: int) -> None:
        """Queue ``item`` as ``user``'s last; ``cost`` (>= 0) is what it takes of their credit."""
        q = self._queues.get(user)
        if q is None:
            q = self._queues[user] = deque()
            self._deficit[user] = 0
            if user not in self._held:
                self._active.append(user)
        q.append((max(0, cost), item))
        self._len += 1

    def pop(self, ready: Callable[[int, T], bool] | None = None) -> tuple[int, T] | None:
        """The next request to serve and its user, or ``None`` when every queued user is held (or none is).
        ``ready(user, item)``: whether a user's first request may start now; a user whose first may not is
        passed over this time (their order kept, no credit given)."""
        passed = 0  # users passed over in a row: when all of them are, nothing can start
        while self._active and passed < len(self._active):
            user = self._active[0]
            q = self._queues[user]
            cost = q[0][0]
            if ready is not None and not ready(user, q[0][1]):
                self._active.rotate(-1)
                passed += 1
                continue
            if self._deficit[user] < cost:
                passed = 0
                # Not enough credit for the head request: a round's credit, and the next user's turn. A user
                # whose head costs many quanta collects them over as many rounds as it takes.
                self._deficit[user] += self.quantum
                self._active.rotate(-1)
                if len(self._active) == 1:
                    # Alone: nobody to be fair to; serve it now rather than spin through the rounds.
                    self._deficit[user] = max(self._deficit[user], cost)
                continue
            self._deficit[user] -= cost
            _, item = q.popleft()
            self._len -= 1
            if not q:
                # An emptied queue keeps no credit (DRR): a user cannot save up for a burst later.
                del self._queues[user], self._deficit[user]
                self._active.popleft()
            return user, item
        return None

    def hold(self, user: int) -> None:
        """Serve nothing more of ``user`` until as many :meth:`release` calls."""
        self._held[user] = self._held.get(user, 0) + 1
        if self._held[user] == 1 and user in self._queues:
            self._active.remove(user)  # O(users with work queued), only when a held user has work queued

    def release(self, user: int) -> None:
        left = self._held[user] - 1
        if left:
            self._held[user] = left
            return
        del self._held[user]
        if user in self._queues:
            self._active.append(user)

    def held(self, user: int) -> bool:
        return user in self._held

    def drain(self) -> list[tuple[int, T]]:
        """Everything queued (held users' too), in no fair order, leaving the queue empty: at shutdown."""
        out = [(user, item) for user, q in self._queues.items() for _, item in q]
        self._queues.clear()
        self._deficit.clear()
        self._active.clear()
        self._len = 0
        return out
