"""Each user's CPU for decoding big requests against ``quota.cpu_share`` (daemon/cpushare.py): the bucket,
the contention rule and the charge, pure and on a fake clock. With the real daemon and two real users:
``test_bounds.py::test_a_users_decodes_wait_for_its_cpu_share_only_while_another_user_is_served``."""

from __future__ import annotations

import pytest

from autosaved.daemon.cpushare import BURST_S, CONTENDED_S, MAX_SLEEP_S, CpuShares, Recent, refill, wait_for


@pytest.mark.parametrize(("tokens", "at", "now", "share", "expected"), [
    (0.0, 0.0, 1.0, 0.5, 0.1),        # refilled, up to the burst
    (-0.2, 0.0, 0.2, 0.5, -0.1),      # half a core for 0.2 s pays back 0.1 CPU-s
    (BURST_S, 5.0, 9.0, 0.5, BURST_S),  # never above the burst
    (-0.2, 3.0, 2.0, 0.5, -0.2),      # a clock that went back refills nothing
])
def test_refill(tokens: float, at: float, now: float, share: float, expected: float) -> None:
    assert refill(tokens, at, now, share) == pytest.approx(expected)


def test_wait_for_sleeps_only_in_debt_and_at_most_the_cap() -> None:
    assert wait_for(0.0, 0.5) == 0.0 and wait_for(0.05, 0.5) == 0.0
    assert wait_for(-0.01, 0.5) == pytest.approx(0.02)
    assert wait_for(-10.0, 0.5) == MAX_SLEEP_S


def test_recent_tells_whether_another_user_sent_a_request_lately() -> None:
    recent = Recent()
    assert not recent.others_since(1, 0.0)
    for t in range(10):
        recent.note(1, float(t))  # user 1 alone, however often
    assert not recent.others_since(1, 0.0)
    recent.note(2, 10.0)
    for t in range(11, 30):
        recent.note(1, float(t))  # user 2's one request is still the latest other than user 1's
    assert recent.others_since(1, 9.5) and not recent.others_since(1, 10.5)
    assert recent.others_since(2, 28.5)  # for user 2, user 1 is the other


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_user_over_its_share_waits_only_while_another_user_is_served() -> None:
    clock = Clock()
    share: list[float | None] = [0.5]
    shares = CpuShares(lambda: share[0], clock)
    assert shares.charge(7, 0.05) == 0.0  # within the burst
    assert shares.charge(7, 0.25) == 0.0  # in debt, but alone on the daemon: never slowed
    assert shares.users_charged() == 1
    shares.note(8)  # another user's request
    assert shares.charge(7, 0.0) == MAX_SLEEP_S  # 0.2 CPU-s in debt at half a core: 0.4 s, slept in pieces
    clock.now += 0.38  # paid back 0.19 of the 0.2
    assert shares.charge(7, 0.0) == pytest.approx(0.02)
    assert shares.charge(8, 0.05) == 0.0  # the other user has its own bucket
    clock.now += CONTENDED_S + 1  # user 8 went quiet, and user 7's bucket refilled
    assert shares.charge(7, 0.0) == 0.0
    assert shares.users_charged() == 1  # a full bucket is dropped: only user 8's is left
    shares.note(8)
    assert shares.charge(7, 1.0) == MAX_SLEEP_S
    share[0] = None  # "off" in a reload: nobody waits, no bucket kept
    assert shares.charge(7, 1.0) == 0.0
    assert shares.charge(8, 0.0) == 0.0 and shares.users_charged() == 0
