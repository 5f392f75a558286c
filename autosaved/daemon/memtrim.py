"""Giving the heap's free pages back to the system after a big save (issue 20).

A save's work is the change it writes: for an agent that put 90,000 checkpoints between two saves, the
page edits, the pages and their chunk records are hundreds of MB of short-lived buffers and small
objects. glibc keeps what they freed inside its heap (a long-lived leaf allocated meanwhile pins the top,
so its own trim at ``free`` never runs), and the daemon's RSS stayed at its peak: measured with
``scripts/rss_per_checkpoint.py`` (20,000 checkpoints filled at ``accepted``, one save), 50 MB of the
heap's 101 MB were free. ``malloc_trim(0)`` hands every whole free page back (``MADV_DONTNEED``; the
memory stays the heap's, so nothing moves and nothing is copied): 46 MB there.

Only once saves wrote at least :data:`TRIM_AFTER_BYTES` since the last trim (what is freed follows what
is written), in a worker thread, and at most once every :data:`MIN_INTERVAL` seconds (a save that finds a
trim too recent leaves one to run when the interval is over): a trim walks the heap's free chunks and holds
each arena while it does, and the event loop, the main thread, allocates from the main arena, so it waits
for the whole trim. Measured (``malloc_trim(0)`` in a thread over a heap of 750,000 freed and 750,000 live
600-1,200 byte objects, the main thread allocating meanwhile): trims of 35 and 68 ms stalled the main
thread 40 and 58 ms. After every big save, a user streaming big updates (issue 19's ``shapes`` role) would
stall every other user's requests that often. Not glibc (musl, macOS): nothing.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Callable
from typing import Final

import anyio.to_thread

log = logging.getLogger("autosaved.memtrim")

TRIM_AFTER_BYTES: Final = 8 * 1024 * 1024
MIN_INTERVAL: Final = 60.0


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        # The interpreter's own symbols (libc among them): no library search, which would run ldconfig.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


TRIM: Final = _malloc_trim()


def trim_in(pending: int, last_at: float | None, now: float) -> float | None:
    """Seconds until a trim is due (0: now) with ``pending`` bytes saved since the last one (at
    ``last_at``, monotonic; None: never); None when there is not enough to be worth one."""
    if TRIM is None or pending < TRIM_AFTER_BYTES:
        return None
    return 0.0 if last_at is None else max(0.0, last_at + MIN_INTERVAL - now)


class _Trimmer:
    def __init__(self) -> None:
        self.pending = 0
        self.last_at: float | None = None
        self.waiting = False


_trimmer = _Trimmer()


async def after_save(job: str, written: int, clock: Callable[[], float] = time.monotonic) -> bool:
    """Trim the heap when a save of ``job`` that wrote ``written`` bytes is done (or later, once the last
    trim is :data:`MIN_INTERVAL` old); whether this call trimmed."""
    t = _trimmer
    t.pending += written
    wait = trim_in(t.pending, t.last_at, clock())
    if wait is None or t.waiting:
        return False  # not worth it yet, or a trim is already waiting for its turn
    if wait > 0:
        t.waiting = True
        try:
            await anyio.sleep(wait)
        finally:
            t.waiting = False
    assert TRIM is not None
    trim = TRIM
    pending, t.pending, t.last_at = t.pending, 0, clock()
    started = time.perf_counter()
    await anyio.to_thread.run_sync(lambda: trim(0))
    log.info("heap trimmed job=%s written=%d ms=%.1f", job, pending, (time.perf_counter() - started) * 1000)
    return True
