"""A short soak (the long one is ``scripts/soak.py --kills 1000``): SIGKILLs at random instants while
clients stream logged and committed updates, saves, gc and deletes; every ack checked after each kill."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from autosaved.testing.soak import Soak


def test_random_sigkills_lose_no_ack(tmp_path: Path, figure: Callable[[str], None]) -> None:
    report = Soak(tmp_path / "soak", seed=5).run(5, max_gap=0.5, daemon_check_every=1)
    figure(report.summary())
    assert report.kills == 5
    assert report.acks_checked >= 10  # the clients really streamed between the kills
    assert report.acks_lost == 0
    assert report.problems == []
    assert report.unexpected_exits == 0
