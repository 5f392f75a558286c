"""A short soak (the long one is ``scripts/soak.py --kills 1000``): SIGKILLs at random instants while
clients stream logged and committed updates, saves, gc and deletes; every ack checked after each kill."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from autosaved.testing.soak import Soak


def test_random_sigkills_lose_no_ack(tmp_path: Path, figure: Callable[[str], None]) -> None:
    report = Soak(tmp_path / "soak", seed=5).run(5, max_gap=0.5, daemon_check_every=1)
    figure(report.summary())
    assert report.kills == 5
    assert report.acks_checked >= 10  # the clients really streamed between the kills
    assert report.acks_lost == 0
    assert report.problems == []
    assert report.unexpected_exits == 0


def test_sigkills_with_accepted_deep_merges_and_a_blinking_bucket(tmp_path: Path, s3server: Any,
                                                                  figure: Callable[[str], None]) -> None:
    """Issue 19: the soak with `accepted` updates and deep merges, replicating to a real SeaweedFS that is
    stopped and resumed at random; after each kill the bucket's newest version holds every `replicated`
    ack (the long run: ``scripts/soak.py --remote``)."""
    report = Soak(tmp_path / "soak", seed=11, remote=s3server).run(4, max_gap=1.5, daemon_check_every=1)
    figure(report.summary())
    assert report.kills == 4 and report.unexpected_exits == 0
    assert report.acks.get("accepted", 0) > 0 and report.acks.get("replicated", 0) > 0
    assert report.bucket_pauses > 0 and report.bucket_checks == 4
    assert report.acks_lost == 0
    assert report.problems == []
