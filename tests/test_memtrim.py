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


def test_saves_within_an_interval_share_one_trailing_trim(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memtrim, "_trimmer", memtrim._Trimmer())
    monkeypatch.setattr(memtrim, "MIN_INTERVAL", 0.5)
    now = [1000.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(memtrim.anyio, "sleep", fake_sleep)

    async def main() -> list[bool]:
        first = await memtrim.after_save("j", TRIM_AFTER_BYTES, clock=lambda: now[0])  # the real trim, now
        now[0] += 0.1
        second = await memtrim.after_save("j", TRIM_AFTER_BYTES, clock=lambda: now[0])  # waits its turn
        return [first, second]

    assert anyio.run(main) == [True, True]
    assert slept == [pytest.approx(0.4)]
    assert memtrim._trimmer.pending == 0
