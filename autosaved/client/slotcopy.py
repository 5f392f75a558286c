"""The copy of an update's bulk leaves into a slot, in pieces that several threads may take.

Where the trainer waits for the copy (an eager ``update()``, a lazy ``fence()`` that finds it unfinished)
its own compute threads are idle, so the copy takes every core the process may use: the calling thread
and up to ``cores - 1`` helper threads at the caller's priority (issue 21: one thread copied a 1.4 GiB
state at 5-6 GB/s on the 2-core host while the other core waited; two threads copy it in about half the
time at the same CPU cost). Each piece is one ``memcpy`` with the GIL released.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np

# Pieces of the bulk copy that the threads take in turn. Small, so a fence that must wait for the piece a
# starved background copier holds waits about one scheduler slice, not several: on a busy host that thread
# runs in short slices between others' (measured at load 8-12 with 8 MiB pieces: update + fence of a
# 1.5 GiB state alone took 0.77 s against eager's 0.48 s). ~5 µs of overhead each.
PIECE: Final = 1024 * 1024
# Below this many bytes a copy stays on the calling thread: waking a helper costs more than it saves.
PARALLEL_MIN: Final = 16 * PIECE
# Helpers beyond a few add nothing: memory bandwidth, not cores, bounds the copy by then.
MAX_HELPERS: Final = 3

Pairs = list[tuple[np.ndarray, np.ndarray]]


class SharedCopy:
    """The bulk copy of one update, split into pieces that any thread may take (the background thread,
    helpers, and a caller that fences before it is done). ``done`` once every piece is copied (or one
    failed): no thread reads a source after that, since a piece is taken before it is copied and ``done``
    waits for every taken piece."""

    def __init__(self, pairs: Pairs) -> None:
        self._pieces: Pairs = []
        self.nbytes = 0
        for dst, src in pairs:
            self.nbytes += dst.nbytes
            for at in range(0, max(1, dst.nbytes), PIECE):
                self._pieces.append((dst[at : at + PIECE], src[at : at + PIECE]))
        self._next = 0
        self._left = len(self._pieces)
        self._lock = threading.Lock()
        self.done = threading.Event()
        self.error: BaseException | None = None
        if not self._pieces:
            self.done.set()

    def work(self) -> None:
        """Copy pieces until none is left to take (numpy releases the GIL for each)."""
        while True:
            with self._lock:
                if self._next >= len(self._pieces) or self.error is not None:
                    return
                dst, src = self._pieces[self._next]
                self._next += 1
            try:
                np.copyto(dst, src)
            except BaseException as exc:
                self.error = exc
                self.done.set()
                raise
            with self._lock:
                self._left -= 1
                if self._left == 0:
                    self.done.set()

    def untaken(self) -> int:
        """Pieces no thread has started yet."""
        with self._lock:
            return len(self._pieces) - self._next

    def wait(self) -> None:
        """Until every piece is copied, by whichever thread took it; raise the copy's error."""
        self.done.wait()
        if self.error is not None:
            raise self.error


_helpers: ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()


def _forget_helpers() -> None:
    # A forked child (a DataLoader worker) inherits the pool but none of its threads: work queued there
    # would never run and would keep its arrays alive. The child starts a pool of its own when it needs one.
    global _helpers, _helpers_lock
    _helpers, _helpers_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_helpers)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def helper_count() -> int:
    """Helper threads for a copy the caller waits for: the cores this process may run on, less its own."""
    return max(0, min(MAX_HELPERS, cores() - 1))


def _pool() -> ThreadPoolExecutor | None:
    global _helpers
    n = helper_count()
    if n == 0:
        return None
    with _helpers_lock:
        if _helpers is None:
            _helpers = ThreadPoolExecutor(max_workers=n, thread_name_prefix="autosaved-copy")
        return _helpers


def assist(shared: SharedCopy) -> None:
    """Let the helper threads take pieces of ``shared`` beside the caller (who must take its own share
    with ``shared.work()`` and then ``shared.wait()``)."""
    left = shared.untaken()
    if left * PIECE < PARALLEL_MIN:
        return
    pool = _pool()
    if pool is None:
        return
    for _ in range(min(helper_count(), left - 1)):
        with contextlib.suppress(RuntimeError):  # the interpreter is shutting down: the caller copies alone
            pool.submit(quietly, shared.work)


def copy_waited(pairs: Pairs) -> None:
    """Copy ``pairs`` now, on this thread and the helpers (the eager ``update()``'s copy)."""
    shared = SharedCopy(pairs)
    assist(shared)
    with contextlib.suppress(BaseException):  # a failed piece is raised by wait(), once
        shared.work()
    shared.wait()


def quietly(work: Callable[[], None]) -> None:
    """Run ``work``; its error is reported through the shared copy, not the executor's future."""
    with contextlib.suppress(BaseException):
        work()
