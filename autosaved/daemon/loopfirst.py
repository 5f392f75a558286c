"""The event loop first: worker threads doing a big request's or a save's Python work step aside while the
event loop has requests to run (issue 19).

Measured (``scripts/hostile_user.py --roles shapes``, 2 cores, the daemon in a CPU group of its own as the
unit file puts it; a probe timed every loop callback over 3 ms and read the loop thread's run-queue wait
from ``/proc/thread-self/schedstat``): beside a user streaming 20,000-key updates, a well-behaved user's
small updates had a p99 of 15-70 ms against 3-8 ms alone, and the loop's slow steps spent a fifth of their
time on the CPU, a third waiting for a core and the rest waiting for the GIL: behind the daemon's own worker
threads, which decoded that user's updates (0.75 of a core) and built the pages of its saves. The GIL's
switch interval (offload.py) only bounds how long one thread keeps the GIL while the other waits on a
core; a worker holding the GIL and taken off the core makes the loop wait a time slice.

So those workers wait instead of competing. The loop's selector marks when the loop blocks for I/O (it has
nothing to run) and when it wakes; a worker inside :func:`stepping_aside` checks at its yield points
(``tree.Walked.step``: every :data:`STEP` entries of a mapping or list decoded, encoded, merged or planned,
every page a save cuts, every slice of a big header unpacked) and, while the loop is awake, blocks on an
event, without the GIL and off the run queue. It runs whenever the loop sleeps. A loop that never sleeps
(flooded by other users) cannot starve it: a worker waits at most :data:`MAX_WAIT` per yield point.

Stepping aside: decoding and planning big updates (offload.py) and the Python work of saves (writer.py).
Not: the log's syncs (a client waits on each, and they spend their time in the kernel, not the GIL).
Outside the daemon (:func:`install` not called) the yield points are never reached and nothing waits.
"""

from __future__ import annotations

import asyncio
import selectors
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from ..tree import Walked
from .cpushare import Meter

# Entries walked between two checks: about 50-100 us of decoding (a check costs well under 1 us).
STEP: Final = 256
# The longest a stepping-aside worker waits for the loop to sleep at one yield point.
MAX_WAIT: Final = 0.002

_loop_asleep = threading.Event()
_local = threading.local()
_installed = False


class LoopFirstSelector(selectors.EpollSelector):
    """The event loop's selector: marks the loop asleep while it blocks waiting for I/O or a timer."""

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)  # work is ready: the loop polls and goes on
        _loop_asleep.set()
        try:
            return super().select(timeout)
        finally:
            _loop_asleep.clear()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop with :class:`LoopFirstSelector` (anyio's ``loop_factory``)."""
    return asyncio.SelectorEventLoop(LoopFirstSelector())


def wait_s(worked: float) -> float:
    """How long a worker that ran ``worked`` seconds since its last wait may wait now (pure): no longer than
    it ran, so a loop that never sleeps slows a worker down at most twice, and at most :data:`MAX_WAIT`.
    (Waiting the whole 2 ms at every yield point made a save of 4,700 small pages take 20-40 s beside a
    user flooding the loop, and the shutdown flush miss its deadline.)"""
    return min(MAX_WAIT, max(0.0, worked))


def yield_point() -> None:
    """Where a stepping-aside worker waits while the loop is awake (:func:`wait_s`), and sleeps while its
    user is over its CPU share (cpushare.py)."""
    if getattr(_local, "aside", False):
        if not _loop_asleep.is_set():
            now = time.perf_counter()
            _loop_asleep.wait(wait_s(now - getattr(_local, "resumed", now)))
            _local.resumed = time.perf_counter()
        meter: Meter | None = getattr(_local, "meter", None)
        if meter is not None:
            meter.check()


def _step() -> None:
    Walked.step_at = Walked.entries + STEP
    yield_point()


def install() -> None:
    """Give the tree walks their yield point (the daemon calls this once, before its loop starts, which
    must come from :func:`new_event_loop`)."""
    global _installed
    _installed = True
    Walked.on_step = _step
    Walked.step_at = Walked.entries + STEP


@contextmanager
def stepping_aside(meter: Meter | None = None) -> Iterator[None]:
    """Within this, the calling (worker) thread waits at its yield points while the event loop is awake,
    and its CPU is charged to ``meter``'s user."""
    _local.aside = _installed
    _local.meter = meter if _installed else None
    _local.resumed = time.perf_counter()
    try:
        yield
    finally:
        _local.aside = False
        _local.meter = None
