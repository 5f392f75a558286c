"""Who the rpc loop serves next (issue 19): deficit round robin over per-user FIFOs, weighted by cost.
Pure (autosaved/fairqueue.py); the real daemon's use of it is in test_bounds.py."""

from __future__ import annotations

import random

import pytest

from autosaved.fairqueue import FairQueue


def served(q: FairQueue[str]) -> list[str]:
    out = []
    while (nxt := q.pop()) is not None:
        out.append(nxt[1])
    return out


def test_a_cheap_request_is_served_before_another_users_expensive_queue() -> None:
    q: FairQueue[str] = FairQueue(quantum=64 * 1024)
    for i in range(50):
        q.push(1, f"a{i}", 300_000)  # user 1 queued 50 expensive requests first
    q.push(2, "b0", 4_000)
    order = served(q)
    assert order.index("b0") <= 1, order[:5]  # at most the one of A's already credited goes first
    assert [x for x in order if x.startswith("a")] == [f"a{i}" for i in range(50)]  # A's own order kept


def test_each_users_order_is_kept_and_shares_follow_cost() -> None:
    rng = random.Random(7)
    q: FairQueue[tuple[int, int]] = FairQueue(quantum=1000)
    pushed: dict[int, list[tuple[int, int]]] = {1: [], 2: [], 3: []}
    for i in range(3000):
        user = rng.choice((1, 2, 3))
        item = (user, i)
        pushed[user].append(item)
        q.push(user, item, {1: 100, 2: 1000, 3: 5000}[user])
    out = []
    while (nxt := q.pop()) is not None:
        assert nxt[0] == nxt[1][0]
        out.append(nxt[1])
    assert len(q) == 0 and len(out) == 3000
    for user, items in pushed.items():
        assert [x for x in out if x[0] == user] == items
    # While all three have work queued, each gets about the same bytes per round: over the first 300
    # served, user 1 (100 B each) is served far more often than user 3 (5,000 B each).
    first = out[:300]
    ones, threes = sum(1 for x in first if x[0] == 1), sum(1 for x in first if x[0] == 3)
    assert ones > 5 * threes > 0


def test_a_held_user_is_skipped_until_released_and_keeps_its_queue() -> None:
    q: FairQueue[str] = FairQueue(quantum=10)
    q.push(1, "a0", 1)
    q.push(1, "a1", 1)
    q.push(2, "b0", 1)
    q.hold(1)
    assert served(q) == ["b0"] and len(q) == 2 and q.queued(1) == 2 and q.held(1)
    q.hold(1)
    q.release(1)
    assert q.pop() is None
    q.release(1)
    assert not q.held(1) and served(q) == ["a0", "a1"]


def test_a_lone_user_is_served_at_once_whatever_the_cost_and_credit_is_not_saved() -> None:
    q: FairQueue[str] = FairQueue(quantum=10)
    q.push(1, "huge", 10**9)
    assert q.pop() == (1, "huge")
    # An emptied queue forgets its credit: user 1 cannot bank rounds while idle.
    q.push(1, "a", 25)
    q.push(2, "b", 5)
    assert served(q) == ["b", "a"]


def test_a_user_whose_first_request_may_not_start_is_passed_over_in_order() -> None:
    q: FairQueue[str] = FairQueue(quantum=10)
    for i in range(3):
        q.push(1, f"d{i}", 1)  # user 1: requests that may not start now (too many of theirs running)
    q.push(2, "b0", 100)
    q.push(2, "b1", 1)
    busy = {1}
    ready = lambda user, item: user not in busy  # noqa: E731
    assert q.pop(ready) == (2, "b0") and q.pop(ready) == (2, "b1") and q.pop(ready) is None
    busy.clear()
    assert [q.pop(ready) for _ in range(3)] == [(1, "d0"), (1, "d1"), (1, "d2")]


def test_drain_returns_everything_and_bad_quantum_is_refused() -> None:
    q: FairQueue[str] = FairQueue()
    q.push(1, "a", 1)
    q.push(2, "b", 1)
    q.hold(2)
    assert sorted(item for _, item in q.drain()) == ["a", "b"] and len(q) == 0 and q.pop() is None
    with pytest.raises(ValueError):
        FairQueue(quantum=0)
