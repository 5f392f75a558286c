"""The deadline flush: commit every accepted delta within ``shutdown_deadline`` (on SIGTERM, and on a
preemption notice), then, with ``[remote]``, go on uploading until the deadline (the plan counts the
upload time: a job fits when its save and its upload both end in time). The plan is the pure
:func:`autosaved.deadline.plan_flush`; this module runs it and reports each job that misses. It gets a
narrow context, never the daemon."""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from ..deadline import FlushPlan, Pending, plan_flush
from ..policy import SaveReason
from .jobs import Job, JobKey
from .notify import Notifier

if TYPE_CHECKING:
    from ..config import Config
    from .replicator import Replicator
    from .writer import Writer

log = logging.getLogger("autosaved.daemon")

# STATUS= is one datagram that `systemctl status` shows on one line: name the first few jobs that missed
# the deadline, each cut to a readable length, and count the rest.
STATUS_NAMES = 5
STATUS_NAME_CHARS = 40


def missed_names(names: list[str]) -> str:
    """``a, b, c`` for the jobs that missed the deadline; long names cut with ``…``, past five ``(+N more)``."""
    shown = [n if len(n) <= STATUS_NAME_CHARS else n[:STATUS_NAME_CHARS - 1] + "…" for n in names[:STATUS_NAMES]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more else "")


@dataclass(frozen=True)
class FlushContext:
    config: Callable[[], Config]
    jobs: Mapping[JobKey, Job]
    writer: Writer
    clock: Callable[[], float]
    notifier: Notifier
    replicator: Replicator | None
    # Snapshot a job now and save it (in the daemon's task group).
    begin_save: Callable[[Job, SaveReason], None]
    # Until some save finishes, or that many seconds.
    wait_save_done: Callable[[float], Awaitable[None]]


async def flush_all(ctx: FlushContext, reason: SaveReason) -> list[Job]:
    """Commit every accepted delta within ``shutdown_deadline``; report each job that misses it.

    The throttle's adaptive rate is off (``throttle.max_write_rate``, a hard cap, still holds). Jobs
    are saved one at a time in the order of :func:`autosaved.deadline.plan_flush`: the set that fits
    the deadline at the measured write speed, picked largest first (most bytes saved), run smallest
    first (most versions committed early if the disk turns out slower), then the rest, smallest first.
    Every commit is logged with the time left and extends systemd's stop timeout. On SIGTERM
    (``reason`` shutdown, with updates refused from the start), saves still writing at the deadline are
    abandoned (their temp files removed) so the daemon exits on time, with code 1. On a
    preemption notice the daemon keeps serving; the flush covers what was accepted before it.
    """
    final = reason is SaveReason.SHUTDOWN
    ctx.writer.bucket.bypass = True
    deadline = ctx.config().shutdown_deadline
    started = ctx.clock()
    targets = {k: j.generation for k, j in ctx.jobs.items() if j.dirty or j.saving}

    def pending() -> list[Job]:
        return [ctx.jobs[k] for k in plan.order if ctx.jobs[k].saved_generation < targets[k]]

    # Job.dirty_bytes drops to zero while a save holds the snapshot: keep what was planned, to report it.
    planned = {k: ctx.jobs[k].dirty_bytes for k in targets}
    plan = _plan(ctx, {k: to_write(n, ctx.jobs[k].root.cost) for k, n in planned.items()}, deadline)
    total = len(plan.order)
    log.info("%s flush: %d dirty jobs, %.1f MiB, deadline %.1fs at %.0f MiB/s%s", reason, total,
             sum(planned.values()) / 2**20, deadline, ctx.writer.flush_speed() / 2**20,
             f", then uploads at {_upload_rate(ctx) / 2**20:.0f} MiB/s" if plan.upload_s else "")
    for key in plan.order:
        if key not in plan.fits:
            up = f" and {plan.upload_s[key]:.1f}s to upload" if plan.upload_s else ""
            log.warning("%s flush: job=%s dirty_bytes=%d needs about %.1fs to save%s, more than the deadline "
                        "leaves; saving it after the jobs that fit", reason, key[1], planned[key],
                        plan.estimate_s[key], up)
    status = f"{reason}: saving {total} dirty jobs within {deadline:g}s"
    if final:
        ctx.notifier.stopping(status)
    else:
        ctx.notifier.status(status)
    ctx.notifier.extend_timeout(deadline + 5)
    flushing: set[JobKey] = set()  # jobs whose save this flush started
    with anyio.move_on_after(deadline):
        committed = 0
        while todo := pending():
            now = ctx.clock()
            startable = [j for j in todo if not j.saving and (j.retry_at is None or j.retry_at <= now)]
            if startable and not any(j.saving and j.key in flushing for j in todo):
                # One flush save at a time, in the plan's order; a background save already running (another
                # user's big job) is not waited for before the next job of the plan starts.
                flushing.add(startable[0].key)
                ctx.begin_save(startable[0], reason)
                await ctx.wait_save_done(math.inf)
            elif any(j.saving for j in todo):
                await ctx.wait_save_done(1.0)
            else:  # every remaining job failed and waits for its retry
                await ctx.wait_save_done(max(0.0, min(j.retry_at or now for j in todo) - now))
            if total - len(pending()) > committed:
                committed = total - len(pending())
                _flush_progress(ctx, reason, committed, total, started)
    if final:
        ctx.writer.bucket.aborted = True  # a save still writing gives up at its next piece
    missed = pending()
    for job in missed:
        log.error("%s flush: job=%s NOT saved before the %.1fs deadline (dirty_bytes=%d, estimated %.1fs, "
                  "saving=%s, last_error=%s)", reason, job.name, deadline, planned[job.key],
                  plan.estimate_s.get(job.key, 0.0), job.saving, job.last_error)
    if missed:
        ctx.notifier.status(f"{reason}: {len(missed)} of {total} dirty jobs NOT saved before the deadline: "
                             f"{missed_names([j.name for j in missed])}")
    else:
        log.info("%s flush: all %d jobs saved in %.2fs", reason, total, ctx.clock() - started)
    return missed

def to_write(dirty_bytes: int, state_bytes: int) -> int:
    """What a save of a job writes at most, for the plan (pure): its dirty bytes count every update, so
    a small state updated often has far more of them than its save writes (issue 19: a well-behaved
    user's 4 KiB state, updated 50 times a second, planned as 8 MB and saved after a hostile user's big
    jobs, missed the deadline), but never more than the state itself."""
    return min(dirty_bytes, state_bytes)


def _upload_rate(ctx: FlushContext) -> float:
    rate = ctx.replicator.flush_upload_rate() if ctx.replicator is not None else None
    return rate or 0.0


def _plan(ctx: FlushContext, planned: dict[JobKey, int], deadline: float) -> FlushPlan[JobKey]:
    """The flush plan. With ``[remote]`` and a reachable store, a job fits only if its save and then the
    upload of its backlog and the new version end within the deadline (uploads of jobs with nothing to
    save occupy the link first); the adaptive upload rate is off meanwhile (``upload_rate`` still holds)."""
    speed = ctx.writer.flush_speed()
    rate = ctx.replicator.flush_upload_rate() if ctx.replicator is not None else None
    if ctx.replicator is None or rate is None:
        return plan_flush([Pending(k, n) for k, n in planned.items()], speed, deadline)
    ctx.replicator.rate.bypass = True
    backlog = ctx.replicator.backlog_bytes()
    busy = sum(n for k, n in backlog.items() if k not in planned) / rate
    return plan_flush([Pending(k, n, upload_bytes=n + backlog.get(k, 0)) for k, n in planned.items()], speed,
                      deadline, upload_rate=rate, upload_busy_s=busy)


async def drain_remote(ctx: FlushContext, started: float) -> None:
    """With ``[remote]``, the shutdown flush goes on uploading what it committed until the deadline;
    what is still not in the bucket then is named in the log and systemd's STATUS."""
    if ctx.replicator is None:
        return
    left = ctx.config().shutdown_deadline - (ctx.clock() - started)
    if ctx.replicator.backlog():
        log.info("shutdown flush: uploading committed versions, %.1fs left", left)
        ctx.notifier.status("shutdown: uploading committed versions to the object store")
        await ctx.replicator.drain(left)
    missed = ctx.replicator.backlog()
    for (_owner, name), versions in missed:
        log.error("shutdown flush: job=%s versions=%s committed locally but NOT uploaded before the deadline",
                  name, versions)
    if missed:
        ctx.notifier.status(f"shutdown: {len(missed)} jobs have versions NOT uploaded to the object store")
    elif ctx.replicator.replicas:
        log.info("shutdown flush: every committed version is in the object store")

def _flush_progress(ctx: FlushContext, reason: SaveReason, done: int, total: int, started: float) -> None:
    left = ctx.config().shutdown_deadline - (ctx.clock() - started)
    log.info("%s flush: %d/%d jobs committed, %.1fs left", reason, done, total, left)
    ctx.notifier.status(f"{reason}: {done}/{total} jobs saved")
    ctx.notifier.extend_timeout(max(0.0, left) + 5)
