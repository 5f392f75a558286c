"""Each user's share of the daemon's CPU for decoding its big requests, while other users are served
(issue 19, ``quota.cpu_share``).

Measured (``scripts/hostile_user.py --roles shapes``, 2 cores): a user streaming updates of 20,000 tiny
maps kept the daemon's decode worker at 0.7 of a core. Stepping aside for the event loop
(:mod:`.loopfirst`) gives the loop the GIL first, but not the cores: the worker, the hostile client
encoding its next update and the well-behaved client all wait for the same two cores, and a worker taken
off its core while it holds the GIL stalls the loop for a time slice. The well-behaved user's p99 stayed at
3-6x its p99 alone.

So the CPU a user's big requests take to decode is charged to that user (each worker thread's CPU time,
read at its yield points) against a token bucket of ``cpu_share`` cores: once over it, and only while
another user has sent a request within :data:`CONTENDED_S`, the worker sleeps (holding neither the GIL
nor a core) until the bucket has refilled. The hostile user's updates then take longer, so it also sends
fewer, and its own client spends less CPU. A user alone on the daemon is never slowed (the bound is on
what one user takes from others), and a small burst (:data:`BURST_S` of CPU) passes at once, so one big
request now and then is not slowed either.

The policy (:func:`refill`, :func:`wait_for`, :class:`Recent`) is pure; :class:`CpuShares` holds the
buckets, one per user with a decode under way or in debt (dropped once full again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Final

# A user counts as being served while its last request is this recent.
CONTENDED_S: Final = 1.0
# CPU seconds a user may take at once before its share applies.
BURST_S: Final = 0.1
# The longest one sleep of a throttled worker: it re-reads the share (a reload) and the contention.
MAX_SLEEP_S: Final = 0.05


def refill(tokens: float, at: float, now: float, share: float) -> float:
    """A bucket of ``tokens`` CPU-seconds at time ``at``, at ``now`` (pure): ``share`` per second, up to
    :data:`BURST_S`."""
    return min(BURST_S, tokens + max(0.0, now - at) * share)


def wait_for(tokens: float, share: float) -> float:
    """How long a worker whose user's bucket holds ``tokens`` sleeps before going on (pure)."""
    return 0.0 if tokens >= 0 else min(MAX_SLEEP_S, -tokens / share)


class Recent:
    """The two users who sent the latest requests, with when: enough to tell whether any user other than
    a given one sent one lately (the latest user other than him is one of the two). O(1) per request."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None
        self.second: tuple[int, float] | None = None

    def note(self, uid: int, now: float) -> None:
        if self.first is not None and self.first[0] != uid:
            self.second = self.first
        self.first = (uid, now)

    def others_since(self, uid: int, since: float) -> bool:
        return any(seen is not None and seen[0] != uid and seen[1] >= since for seen in (self.first, self.second))


class CpuShares:
    """The buckets (:meth:`charge` from worker threads, :meth:`note` from the event loop)."""

    def __init__(self, share: Callable[[], float | None], clock: Callable[[], float] = time.monotonic) -> None:
        self.share = share
        self.clock = clock
        self.recent = Recent()
        self._buckets: dict[int, tuple[float, float]] = {}
        self._lock = threading.Lock()
        # Seconds workers slept for their user's share, all users together (status: daemon.edge).
        self.throttled_s = 0.0

    def note(self, uid: int) -> None:
        """A request from ``uid`` arrived."""
        self.recent.note(uid, self.clock())

    def charge(self, uid: int, cpu_s: float) -> float:
        """Charge ``cpu_s`` of CPU to ``uid``; how long its worker must sleep now (0: go on)."""
        share = self.share()
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(uid, (BURST_S, now))
            tokens = refill(tokens, at, now, share or 0.0) - cpu_s
            if share is None or tokens >= BURST_S:
                self._buckets.pop(uid, None)
                return 0.0
            self._buckets[uid] = (tokens, now)
            if not self.recent.others_since(uid, now - CONTENDED_S):
                return 0.0
            return wait_for(tokens, share)

    def users_charged(self) -> int:
        return len(self._buckets)


class Meter:
    """One worker's decode for one user: the CPU its thread spent since the last yield point, charged and
    slept for (:func:`loopfirst.yield_point` calls :meth:`check`)."""

    def __init__(self, shares: CpuShares, uid: int) -> None:
        self.shares = shares
        self.uid = uid
        self._cpu = time.thread_time()

    def check(self) -> None:
        cpu = time.thread_time()
        spent, self._cpu = cpu - self._cpu, cpu
        while (sleep := self.shares.charge(self.uid, spent)) > 0:
            time.sleep(sleep)
            self.shares.throttled_s += sleep
            spent = 0.0
