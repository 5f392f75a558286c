"""Which jobs a deadline flush saves first: a pure function of (pending jobs, write speed, time left).

A version is all or nothing: a save cut off by the deadline is worth zero bytes. So the order matters
only when not everything fits, and then the question is a knapsack: pick the jobs whose estimated write
times fit in the time left and whose bytes add up to the most. The plan is

1. **fit** (greedy knapsack, largest first): walk the jobs from the most dirty bytes to the least and
   keep each one that still fits in the remaining budget. Largest-first keeps big states (a model
   and optimizer) ahead of crumbs whenever they fit, and is never worse than half the optimum;
2. **run the fitting set smallest first**: shortest-job-first commits the most versions early, so an
   estimate that turns out optimistic (the disk slowed down) loses as few jobs as possible;
3. **then the rest, smallest first**: estimates can be pessimistic too, so jobs that seemed not to fit
   are still attempted with whatever time remains, and reported if they miss.

Estimates are ``dirty_bytes / write_rate`` plus a fixed per-save cost (fsyncs, manifest). Dirty bytes
count what changed since the last version, which is what a content-addressed save writes (a bound from
above: rewriting the same leaf twice counts twice).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

SAVE_OVERHEAD_S = 0.05


@dataclass(frozen=True)
class Pending(Generic[K]):
    key: K
    dirty_bytes: int


@dataclass(frozen=True)
class FlushPlan(Generic[K]):
    order: tuple[K, ...]
    fits: frozenset[K]  # jobs expected to commit before the deadline
    estimate_s: dict[K, float]


def estimate_s(dirty_bytes: int, write_rate: float) -> float:
    return SAVE_OVERHEAD_S + (dirty_bytes / write_rate if write_rate > 0 else float("inf"))


def plan_flush(pending: Sequence[Pending[K]], write_rate: float, time_left: float) -> FlushPlan[K]:
    est = {p.key: estimate_s(p.dirty_bytes, write_rate) for p in pending}
    budget = time_left
    fits: set[K] = set()
    for p in sorted(pending, key=lambda p: -p.dirty_bytes):
        if est[p.key] <= budget:
            fits.add(p.key)
            budget -= est[p.key]
    by_size = sorted(pending, key=lambda p: p.dirty_bytes)
    order = [p.key for p in by_size if p.key in fits] + [p.key for p in by_size if p.key not in fits]
    return FlushPlan(order=tuple(order), fits=frozenset(fits), estimate_s=est)
