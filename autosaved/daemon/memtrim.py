"""Giving the heap's free pages back to the system after a big save (issue 20).

A save's work is the change it writes: for an agent that put 90,000 checkpoints between two saves, the
page edits, the pages and their chunk records are hundreds of MB of short-lived buffers and small
objects. glibc keeps what they freed inside its heap (a long-lived leaf allocated meanwhile pins the top,
so its own trim at ``free`` never runs), and the daemon's RSS stayed at its peak: measured with
``scripts/rss_per_checkpoint.py`` (20,000 checkpoints filled at ``accepted``, one save), 50 MB of the
heap's 101 MB were free. ``malloc_trim(0)`` hands every whole free page back (``MADV_DONTNEED``; the
memory stays the heap's, so nothing moves and nothing is copied): 46 MB there.

Only once saves wrote at least :data:`TRIM_AFTER_BYTES` since the last trim (what is freed follows what
is written), in a worker thread, and at most once every :data:`MIN_INTERVAL` seconds (a save that finds the
last trim too recent leaves its bytes to the next save's trim), after the save has let go of its job: a
trim walks the heap's free chunks and holds
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
        self.running = False


_trimmer = _Trimmer()


async def after_save(job: str, written: int, clock: Callable[[], float] = time.monotonic) -> bool:
    """Trim the heap after a save of ``job`` that wrote ``written`` bytes, if enough was saved since the
    last trim and that was :data:`MIN_INTERVAL` ago or more (else the bytes wait for a later save's
    trim: nothing sleeps here, so no save, restore or shutdown ever waits for a trim's turn); whether it
    trimmed."""
    t = _trimmer
    t.pending += written
    if trim_in(t.pending, t.last_at, clock()) != 0.0 or t.running:
        return False
    assert TRIM is not None
    trim = TRIM
    pending, t.pending, t.last_at, t.running = t.pending, 0, clock(), True
    started = time.perf_counter()
    try:
        await anyio.to_thread.run_sync(lambda: trim(0))
    finally:
        t.running = False
    log.info("heap trimmed job=%s written=%d ms=%.1f", job, pending, (time.perf_counter() - started) * 1000)
    return True
