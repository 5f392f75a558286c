"""gcpolicy.py: the daemon's full garbage collections run on its timer, never on CPython's own trigger
(issue 19: automatic full collections over a hostile user's millions of held containers paused the daemon
for up to 392 ms several times a minute). In process: the interpreter's collector itself, no mock."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import anyio
import pytest

from autosaved.daemon import gcpolicy


class Node:
    def __init__(self) -> None:
        self.me: Node | None = self


@pytest.fixture
def restored_thresholds() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*before)


def test_only_the_young_generations_are_collected_automatically(restored_thresholds: None) -> None:
    young, middle, _ = gc.get_threshold()
    gcpolicy.install()
    assert gc.get_threshold() == (young, middle, gcpolicy.NEVER)
    gc.collect()
    full_before = gc.get_stats()[2]["collections"]
    for _ in range(200_000):  # many young collections' worth of tracked garbage
        Node()
    assert gc.get_stats()[2]["collections"] == full_before


def test_the_timer_collects_cycles_that_outlived_the_young_generations(restored_thresholds: None) -> None:
    gcpolicy.install()
    cycle = Node()
    gone = weakref.ref(cycle)
    gc.collect(1)  # into the oldest generation, which nothing collects automatically now
    del cycle
    for _ in range(50_000):
        Node()
    assert gone() is not None  # still there: only a full collection frees it

    async def main() -> None:
        with anyio.move_on_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(gcpolicy.full_collections, 0.05)
                while gone() is not None:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()

    anyio.run(main)
    assert gone() is None
