"""The scheduler: one loop that asks :func:`autosaved.policy.decide` about the jobs something asked for or
whose wake-up came (wakeups.py), begins the saves that are due, and sleeps until the earliest next wake-up
or a poke. It also keeps the save-done waiters the deadline flush waits on. It gets a narrow context,
never the daemon."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio

from ..policy import SaveReason, decide
from ..storage.faults import point
from .jobs import Job, JobKey
from .wakeups import Wakeups


@dataclass(frozen=True)
class SchedulerContext:
    clock: Callable[[], float]
    jobs: Callable[[], Mapping[JobKey, Job]]
    shutting_down: Callable[[], bool]
    # Begins a save of the job in the daemon's task group (Writer.begin).
    begin_save: Callable[[Job, SaveReason], None]


class Scheduler:
    def __init__(self, ctx: SchedulerContext) -> None:
        self.ctx = ctx
        self._wake = anyio.Event()
        # Which jobs the scheduler decides for at its next pass, and when (issue 19): see wakeups.py.
        self.wakeups = Wakeups()
        # When the sleeping scheduler wakes up by itself (see poke_for); inf: not asleep on a timer.
        self._wake_at = math.inf
        self._save_waiters: list[anyio.Event] = []

    def poke(self) -> None:
        """Wake the scheduler to decide for every job (a reload changed every job's policy)."""
        self.wakeups.every()
        self._wake.set()

    def poke_job(self, job: Job) -> None:
        """Wake the scheduler to decide for ``job`` (a save asked for, a finished save, a full log): one
        decision, not one per job of the host (issue 19)."""
        self.wakeups.now(job.key)
        self._wake.set()

    def poke_for(self, job: Job) -> None:
        """After an update of ``job``: one ``decide``, for the job that changed (perf, issue 14). Due now:
        the scheduler decides for it at once; due later: its wake-up is kept (the earliest one), and the
        scheduler woken only if that is before its next wake-up."""
        decision = decide(job.view(), self.ctx.clock())
        if decision.reason is not None:
            self.poke_job(job)
        elif decision.next_wake_at is not None:
            self.wakeups.at(job.key, decision.next_wake_at)
            if decision.next_wake_at < self._wake_at:
                self._wake.set()

    def save_done(self) -> None:
        for waiter in self._save_waiters:
            waiter.set()
        self._save_waiters.clear()
        self._wake.set()

    async def wait_save_done(self, timeout: float) -> None:
        """Until some save finishes, or ``timeout`` seconds (each caller has its own event, so concurrent
        flushes never steal each other's wake-ups)."""
        event = anyio.Event()
        self._save_waiters.append(event)
        with anyio.move_on_after(timeout):
            await event.wait()

    async def run(self) -> None:
        # A (re)started scheduler decides for every job once: nothing a failed pass had taken is lost.
        self.wakeups.every()
        while True:
            self._wake = anyio.Event()
            point("task", "scheduler", "before")
            now = self.ctx.clock()
            if not self.ctx.shutting_down():
                # Only the jobs something asked for, or whose wake-up came (every job after a reload).
                jobs = self.ctx.jobs()
                keys = self.wakeups.take(now)
                for key in list(jobs) if keys is None else keys:
                    job = jobs.get(key)
                    if job is None or job.deleted:
                        continue
                    decision = decide(job.view(), now)
                    if decision.reason is not None:
                        self.ctx.begin_save(job, decision.reason)
                    elif decision.next_wake_at is not None:
                        self.wakeups.at(key, decision.next_wake_at)
            # Shutting down: the flush saves every job; the scheduler only waits (as before, for a poke).
            wake_at = math.inf if self.ctx.shutting_down() else self.wakeups.next_at()
            self._wake_at = wake_at
            with anyio.move_on_after(max(0.0, wake_at - now)):
                await self._wake.wait()
