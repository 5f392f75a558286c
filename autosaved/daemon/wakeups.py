"""Which jobs the scheduler decides for, and when (issue 19: a request, or a save finishing, costs the
scheduler a decision for that job, never one for every job of the host).

Jobs to decide at the next pass (something changed them: an update, a save request, a finished save, a
full log), and a heap of per-job wake-up times (when :func:`autosaved.policy.decide` said a job becomes
due). A job keeps at most one live wake-up, its earliest: a later one is pushed when the earlier fires and
the decision says "not yet" (so an update that only moves an idle timer later costs O(1)). A reload, which
changes every job's policy, asks for a pass over every job. Pure bookkeeping: O(log jobs) per change.
"""

from __future__ import annotations

import heapq
import math

from .jobs import JobKey


class Wakeups:
    def __init__(self) -> None:
        self._due: dict[JobKey, None] = {}  # an ordered set: decided in the order they were asked for
        self._every = True  # the first pass looks at every job (none are loaded yet at start)
        self._heap: list[tuple[float, JobKey]] = []
        self._at: dict[JobKey, float] = {}  # each job's live wake-up: heap entries that differ are stale
        self.decided = 0  # jobs handed to a pass so far (tests read it: the scheduler's work)

    def now(self, key: JobKey) -> None:
        self._due[key] = None

    def every(self) -> None:
        self._every = True

    def at(self, key: JobKey, when: float) -> None:
        current = self._at.get(key)
        if current is None or when < current:
            self._at[key] = when
            heapq.heappush(self._heap, (when, key))

    def next_at(self) -> float:
        """When the next pass is due (``-inf``: now; ``inf``: only when something asks)."""
        if self._due or self._every:
            return -math.inf
        while self._heap:
            when, key = self._heap[0]
            if self._at.get(key) == when:
                return when
            heapq.heappop(self._heap)
        return math.inf

    def take(self, now: float) -> list[JobKey] | None:
        """The jobs to decide for at ``now`` (``None``: every job), forgotten here until asked again."""
        if self._every:
            self._every = False
            self._due.clear()
            self._heap.clear()
            self._at.clear()
            return None
        keys = list(self._due)
        self._due.clear()
        while self._heap and self._heap[0][0] <= now:
            when, key = heapq.heappop(self._heap)
            if self._at.get(key) == when:
                del self._at[key]
                keys.append(key)
        self.decided += len(keys)
        return keys
