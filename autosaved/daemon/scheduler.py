"""The scheduler: one loop that asks :func:`autosaved.policy.decide` about every job, begins the saves
that are due, and sleeps until the earliest next wake-up or a poke. It also keeps the save-done waiters
the deadline flush waits on. It gets a narrow context, never the daemon."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import anyio

from ..policy import SaveReason, decide
from ..storage.faults import point
from .jobs import Job


@dataclass(frozen=True)
class SchedulerContext:
    clock: Callable[[], float]
    jobs: Callable[[], Iterable[Job]]
    shutting_down: Callable[[], bool]
    # Begins a save of the job in the daemon's task group (Writer.begin).
    begin_save: Callable[[Job, SaveReason], None]


class Scheduler:
    def __init__(self, ctx: SchedulerContext) -> None:
        self.ctx = ctx
        self._wake = anyio.Event()
        # When the sleeping scheduler wakes up by itself (see poke_for); inf: not asleep on a timer.
        self._wake_at = math.inf
        self._save_waiters: list[anyio.Event] = []

    def poke(self) -> None:
        """Wake the scheduler: something changed that may make a save due sooner."""
        self._wake.set()

    def poke_for(self, job: Job) -> None:
        """After an update of ``job``: wake the scheduler only if the job may now be due before the
        scheduler's next wake-up (perf, issue 14). Waking it on every update made each small update
        cost a ``decide`` per job of the host; this is one ``decide``, for the job that changed."""
        decision = decide(job.view(), self.ctx.clock())
        if decision.reason is not None or (decision.next_wake_at is not None
                                           and decision.next_wake_at < self._wake_at):
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
        while True:
            self._wake = anyio.Event()
            point("task", "scheduler", "before")
            now = self.ctx.clock()
            wake_at = math.inf
            if not self.ctx.shutting_down():
                for job in list(self.ctx.jobs()):
                    if job.deleted:
                        continue
                    decision = decide(job.view(), now)
                    if decision.reason is not None:
                        self.ctx.begin_save(job, decision.reason)
                    elif decision.next_wake_at is not None:
                        wake_at = min(wake_at, decision.next_wake_at)
            self._wake_at = wake_at
            with anyio.move_on_after(max(0.0, wake_at - now)):
                await self._wake.wait()
