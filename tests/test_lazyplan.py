"""client/lazyplan.py: where a lazy update's copy runs (pure; issue 21)."""

from __future__ import annotations

from autosaved.client.lazyplan import FIRST_WAIT, MAX_WAIT, MIN_WAIT, copy_at, fence_wait


def test_the_copy_overlaps_only_where_a_core_is_left_over() -> None:
    assert copy_at(cores=2, compute_threads=2) == "fence"  # the host: PyTorch fills both cores
    assert copy_at(cores=1, compute_threads=1) == "fence"
    assert copy_at(cores=2, compute_threads=1) == "overlap"  # a numpy trainer on one thread
    assert copy_at(cores=16, compute_threads=8) == "overlap"
    assert copy_at(cores=16, compute_threads=16) == "fence"
    assert copy_at(cores=4, compute_threads=2, busy_threads=2) == "fence"  # other busy threads count
    assert copy_at(cores=4, compute_threads=2, busy_threads=1) == "overlap"
    assert copy_at(cores=2, compute_threads=0) == "overlap"  # the caller is one thread at least
    assert copy_at(cores=1, compute_threads=0) == "fence"
    assert copy_at(cores=3, compute_threads=2, busy_threads=-5) == "overlap"  # nonsense counts as none


def test_a_copy_left_for_the_fence_waits_about_two_of_the_callers_steps() -> None:
    assert fence_wait(None) == FIRST_WAIT
    assert fence_wait(1.2) == 2.4
    assert fence_wait(0.001) == MIN_WAIT  # a fast loop still gets a second before the background copies
    assert fence_wait(3600.0) == MAX_WAIT  # an update is sent within a minute even if no fence ever comes
    assert MIN_WAIT <= FIRST_WAIT <= MAX_WAIT
