"""Heap trims after big saves (autosaved/daemon/memtrim.py): at most one every ``MIN_INTERVAL`` seconds,
a later one waiting for its turn rather than lost. Pure policy, and the real ``malloc_trim`` in process."""

from __future__ import annotations

import anyio
import pytest

from autosaved.daemon import memtrim
from autosaved.daemon.memtrim import MIN_INTERVAL, TRIM_AFTER_BYTES, trim_in


def test_a_trim_is_due_after_enough_bytes_and_at_most_once_an_interval() -> None:
    if memtrim.TRIM is None:
        pytest.fail("no malloc_trim in this libc: the daemon runs on glibc hosts")
    assert trim_in(TRIM_AFTER_BYTES - 1, None, 100.0) is None  # too little freed to be worth it
    assert trim_in(TRIM_AFTER_BYTES, None, 100.0) == 0.0  # never trimmed: now
    assert trim_in(TRIM_AFTER_BYTES, 100.0, 100.0 + MIN_INTERVAL) == 0.0
    assert trim_in(TRIM_AFTER_BYTES, 100.0, 110.0) == pytest.approx(MIN_INTERVAL - 10.0)


def test_a_save_within_the_interval_leaves_its_bytes_to_a_later_trim_and_never_waits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing waits for a trim's turn: a save (and the restore waiting for its job) goes on at once. A
    trailing trim that slept in the save's task held the job's io lock a minute: a restore of a 64 MiB
    version took 59 s instead of 0.16 s."""
    monkeypatch.setattr(memtrim, "_trimmer", memtrim._Trimmer())
    now = [1000.0]

    async def no_sleep(seconds: float) -> None:
        raise AssertionError(f"after_save slept {seconds} s")

    monkeypatch.setattr(memtrim.anyio, "sleep", no_sleep)

    async def main() -> list[bool]:
        first = await memtrim.after_save("j", TRIM_AFTER_BYTES, clock=lambda: now[0])  # the real trim, now
        now[0] += 1.0
        second = await memtrim.after_save("j", TRIM_AFTER_BYTES, clock=lambda: now[0])  # too soon: left
        left = memtrim._trimmer.pending
        now[0] += MIN_INTERVAL
        third = await memtrim.after_save("j", 1, clock=lambda: now[0])  # trims what the second left, too
        return [first, second, left == TRIM_AFTER_BYTES, third]

    assert anyio.run(main) == [True, False, True, True]
    assert memtrim._trimmer.pending == 0
