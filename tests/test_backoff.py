"""Retry backoff with jitter (issue 22 bug 13): a pure function of (attempt, rng), pinned by a seed."""

from __future__ import annotations

import random

import pytest

from autosaved.backoff import backoff


def test_each_wait_lies_in_the_upper_half_of_its_exponential_step() -> None:
    rng = random.Random(7)
    waits = [backoff(n, base=0.5, cap=30.0, rng=rng) for n in range(12)]
    for n, wait in enumerate(waits):
        step = min(30.0, 0.5 * 2**n)
        assert step / 2 <= wait <= step, (n, wait)
    again = random.Random(7)
    assert waits == [backoff(n, base=0.5, cap=30.0, rng=again) for n in range(12)]  # the seed pins it
    assert 15.0 <= backoff(10_000, base=0.5, cap=30.0, rng=rng) <= 30.0  # no overflow far out


def test_hosts_that_failed_together_retry_apart() -> None:
    # 100 hosts whose uploads failed in the same second: their 5th retries (step 16 s) spread over the
    # whole upper half of the step instead of landing in one instant, as a fixed schedule made them.
    rng = random.Random(1)
    fifth = [backoff(5, base=0.5, cap=30.0, rng=rng) for _ in range(100)]
    assert min(fifth) >= 8.0 and max(fifth) <= 16.0
    assert max(fifth) - min(fifth) > 6.0
    assert len({round(w, 2) for w in fifth}) > 90


def test_bad_arguments_are_refused() -> None:
    for kwargs in ({"attempt": -1, "base": 1.0, "cap": 2.0}, {"attempt": 0, "base": 0.0, "cap": 2.0},
                   {"attempt": 0, "base": 3.0, "cap": 2.0}):
        with pytest.raises(ValueError):
            backoff(**kwargs)  # type: ignore[arg-type]
