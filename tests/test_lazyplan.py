"""client/lazyplan.py: where a lazy update's copy runs (pure; issue 21)."""

from __future__ import annotations

from autosaved.client.lazyplan import FIRST_WAIT, GAP_FACTOR, MAX_WAIT, MIN_WAIT, copy_at, fence_wait


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


def test_a_copy_left_for_the_fence_waits_several_of_the_callers_steps() -> None:
    """Issue 21: with twice the last step, a step 2-3x slower than the one before (common on a shared host)
    ran past the wait, and the copy went to the background beside the caller's step."""
    assert fence_wait(None) == FIRST_WAIT
    assert fence_wait(1.2) == MIN_WAIT  # a 1.2 s step that takes 8x as long the next time still fences in time
    assert fence_wait(1.2 * 3) == 1.2 * 3 * GAP_FACTOR >= 3 * 1.2 * 3  # a 3x slower step still fences in time
    assert fence_wait(0.001) == MIN_WAIT  # a fence right after the update (wait(), save()) teaches no tiny wait
    assert fence_wait(3600.0) == MAX_WAIT  # an update is sent within two minutes even if no fence ever comes
    assert MIN_WAIT <= FIRST_WAIT <= MAX_WAIT and FIRST_WAIT >= 30  # a first step on fresh memory, loaded: 17 s
