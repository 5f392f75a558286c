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

**With the object store** (``upload_rate`` given) a job counts only once its new version is also in the
bucket (on a spot host the disk goes with the host), and the flush is a two-stage pipeline: the disk
commits one job at a time while the link uploads what was committed (each job's backlog first: uploads go
in order), one shared link. That is the two-machine flow shop, whose shortest schedule is Johnson's rule:
jobs that write faster than they upload first, by write time ascending, then the others by upload time
descending. So the fitting set is picked largest first as above but kept only while its Johnson schedule
(after ``upload_busy_s`` of other jobs' backlog already on the link) ends within the time left, and it runs
in that order; the rest follow, smallest first. Past ``EXACT_LIMIT`` jobs the check is the serial bound
(every write, then every upload), which is never optimistic.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

SAVE_OVERHEAD_S = 0.05
UPLOAD_OVERHEAD_S = 0.1  # per version: lease renewals and the manifest, each a round trip
EXACT_LIMIT = 200  # jobs: above, the fitting check is the serial bound (the exact one is quadratic)


@dataclass(frozen=True)
class Pending(Generic[K]):
    key: K
    dirty_bytes: int
    # With [remote]: the bytes that must go up before this job's new version is in the bucket (its
    # backlog of committed versions plus what the save writes).
    upload_bytes: int = 0


@dataclass(frozen=True)
class FlushPlan(Generic[K]):
    order: tuple[K, ...]
    fits: frozenset[K]  # jobs expected to commit (and with an upload rate, upload) before the deadline
    estimate_s: dict[K, float]  # the local save
    upload_s: dict[K, float] = field(default_factory=dict)  # the upload after it (with an upload rate)


def estimate_s(dirty_bytes: int, write_rate: float) -> float:
    return SAVE_OVERHEAD_S + (dirty_bytes / write_rate if write_rate > 0 else float("inf"))


def upload_estimate_s(upload_bytes: int, upload_rate: float) -> float:
    return UPLOAD_OVERHEAD_S + (upload_bytes / upload_rate if upload_rate > 0 else float("inf"))


def johnson_order(keys: Sequence[K], write: Mapping[K, float], upload: Mapping[K, float]) -> list[K]:
    """The order that finishes a two-stage (write, then upload) pipeline soonest (Johnson, 1954)."""
    first = sorted((k for k in keys if write[k] <= upload[k]), key=lambda k: write[k])
    last = sorted((k for k in keys if write[k] > upload[k]), key=lambda k: -upload[k])
    return first + last


def pipeline_end(order: Sequence[K], write: Mapping[K, float], upload: Mapping[K, float],
                 upload_busy_s: float = 0.0) -> float:
    """When the last upload of ``order`` ends: one disk, one link, each job's upload after its write."""
    disk, link = 0.0, upload_busy_s
    for k in order:
        disk += write[k]
        link = max(link, disk) + upload[k]
    return max(disk, link)


def plan_flush(pending: Sequence[Pending[K]], write_rate: float, time_left: float, *,
               upload_rate: float | None = None, upload_busy_s: float = 0.0) -> FlushPlan[K]:
    est = {p.key: estimate_s(p.dirty_bytes, write_rate) for p in pending}
    by_size = sorted(pending, key=lambda p: p.dirty_bytes)
    if upload_rate is None:
        budget = time_left
        fits: set[K] = set()
        for p in sorted(pending, key=lambda p: -p.dirty_bytes):
            if est[p.key] <= budget:
                fits.add(p.key)
                budget -= est[p.key]
        order = [p.key for p in by_size if p.key in fits] + [p.key for p in by_size if p.key not in fits]
        return FlushPlan(order=tuple(order), fits=frozenset(fits), estimate_s=est)
    up = {p.key: upload_estimate_s(p.upload_bytes, upload_rate) for p in pending}
    exact = len(pending) <= EXACT_LIMIT
    chosen: list[K] = []
    for p in sorted(pending, key=lambda p: -p.dirty_bytes):
        trial = [*chosen, p.key]
        end = (pipeline_end(johnson_order(trial, est, up), est, up, upload_busy_s) if exact
               else upload_busy_s + sum(est[k] + up[k] for k in trial))
        if end <= time_left:
            chosen = trial
    ordered = johnson_order(chosen, est, up)
    rest = [p.key for p in by_size if p.key not in set(chosen)]
    return FlushPlan(order=tuple(ordered + rest), fits=frozenset(chosen), estimate_s=est, upload_s=up)
