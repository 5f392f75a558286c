"""Giving the heap's free pages back to the system after a big save (issue 20).

A save's work is the change it writes: for an agent that put 90,000 checkpoints between two saves, the
page edits, the pages and their chunk records are hundreds of MB of short-lived buffers and small
objects. glibc keeps what they freed inside its heap (a long-lived leaf allocated meanwhile pins the top,
so its own trim at ``free`` never runs), and the daemon's RSS stayed at its peak: measured with
``scripts/rss_per_checkpoint.py`` (20,000 checkpoints filled at ``accepted``, one save), 50 MB of the
heap's 101 MB were free. ``malloc_trim(0)`` hands every whole free page back (``MADV_DONTNEED``; the
memory stays the heap's, so nothing moves and nothing is copied): 46 MB there.

Only after a save that wrote at least :data:`TRIM_AFTER_BYTES` (what is freed follows what is written),
in a worker thread: a trim walks the heap's free chunks (~30 ms over a 500 MB heap), and holds each arena
while it does, so a small save, which frees little, pays nothing. Not glibc (musl, macOS): nothing.
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


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        # The interpreter's own symbols (libc among them): no library search, which would run ldconfig.
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


TRIM: Final = _malloc_trim()


def worth_trimming(written: int) -> bool:
    return TRIM is not None and written >= TRIM_AFTER_BYTES


async def after_save(job: str, written: int) -> bool:
    """Trim the heap when a save of ``job`` that wrote ``written`` bytes is done; whether it did."""
    if not worth_trimming(written):
        return False
    assert TRIM is not None
    trim = TRIM
    started = time.perf_counter()
    await anyio.to_thread.run_sync(lambda: trim(0))
    log.info("heap trimmed job=%s written=%d ms=%.1f", job, written, (time.perf_counter() - started) * 1000)
    return True
