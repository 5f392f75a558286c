"""The event loop first (autosaved/daemon/loopfirst.py): the loop's selector says when the loop sleeps, a
worker stepping aside waits at its yield points while the loop is awake (and only then, and only such a
worker), and the tree walks reach their yield points. In process: threads, a socket pair and a real
asyncio loop; no clock is asserted (a waiting worker is shown blocked by an event it cannot pass without)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from autosaved.daemon import loopfirst
from autosaved.daemon.rpcupdate import _decode_delta, _plan
from autosaved.state import empty_node
from autosaved.tree import Walked, to_node


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(Walked, "on_step", None)
    monkeypatch.setattr(loopfirst, "_installed", False)
    loopfirst.install()
    yield
    Walked.on_step = None
    Walked.step_at = 1 << 62


def test_the_selector_marks_the_loop_asleep_only_while_it_blocks() -> None:
    sel = loopfirst.LoopFirstSelector()
    a, b = socket.socketpair()
    try:
        sel.register(a, 1)  # EVENT_READ
        assert sel.select(0) == [] and not loopfirst._loop_asleep.is_set()
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(sel.select(60)))
        t.start()
        assert loopfirst._loop_asleep.wait(60)  # blocked in select: asleep
        b.send(b"x")
        t.join(60)
        assert not t.is_alive() and len(result[0]) == 1  # type: ignore[arg-type]
        assert not loopfirst._loop_asleep.is_set()  # awake again, with work
    finally:
        sel.close()
        a.close()
        b.close()


def test_a_worker_waits_no_longer_than_it_ran_and_at_most_max_wait() -> None:
    assert loopfirst.wait_s(0.0005) == 0.0005
    assert loopfirst.wait_s(10.0) == loopfirst.MAX_WAIT
    assert loopfirst.wait_s(-1.0) == 0.0  # a clock read out of order never makes a negative wait


def test_a_worker_stepping_aside_waits_while_the_loop_is_awake(installed: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loopfirst, "MAX_WAIT", 600.0)
    monkeypatch.setattr(loopfirst, "wait_s", lambda worked: 600.0)  # as if it had run long: the whole wait
    loopfirst._loop_asleep.clear()
    passed = threading.Event()

    def worker() -> None:
        with loopfirst.stepping_aside():
            loopfirst.yield_point()
        passed.set()

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert not passed.wait(0.3)  # the loop is awake: it cannot pass for 600 s
        loopfirst._loop_asleep.set()  # the loop goes to sleep
        assert passed.wait(60)
    finally:
        loopfirst._loop_asleep.set()
        t.join(60)
        loopfirst._loop_asleep.clear()


def test_a_worker_waits_at_most_max_wait_and_other_threads_never(installed: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    loopfirst._loop_asleep.clear()
    monkeypatch.setattr(loopfirst, "MAX_WAIT", 600.0)
    done: list[str] = []
    t = threading.Thread(target=lambda: (loopfirst.yield_point(), done.append("plain")))
    t.start()
    t.join(60)
    assert done == ["plain"]  # not stepping aside: no wait although the loop is awake
    monkeypatch.setattr(loopfirst, "MAX_WAIT", 0.001)

    def starved() -> None:
        with loopfirst.stepping_aside():
            for _ in range(20):
                loopfirst.yield_point()
        done.append("starved")

    t = threading.Thread(target=starved)
    t.start()
    t.join(60)
    assert done == ["plain", "starved"]  # a loop that never sleeps does not stop it


def test_a_real_loop_sleeps_through_its_selector_and_wakes_for_work() -> None:
    loop = loopfirst.new_event_loop()
    seen: list[bool] = []
    woken = asyncio.Event()

    def watcher() -> None:
        seen.append(loopfirst._loop_asleep.wait(60))  # the loop waits for the event: asleep
        loop.call_soon_threadsafe(woken.set)

    async def main() -> None:
        seen.append(loopfirst._loop_asleep.is_set())  # running a callback: awake
        t = threading.Thread(target=watcher)
        t.start()
        await woken.wait()
        seen.append(loopfirst._loop_asleep.is_set())  # woken by the watcher's work: awake again
        t.join(60)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    assert seen == [False, True, False]


def test_the_decode_and_the_plan_of_a_big_update_reach_their_yield_points(installed: None,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    steps: list[int] = []
    real = Walked.on_step
    assert real is not None

    def counting() -> None:
        steps.append(Walked.entries)
        real()

    monkeypatch.setattr(Walked, "on_step", counting)
    node, blobs = to_node({"m": {str(j): {"a": j} for j in range(20 * loopfirst.STEP)}}, allow_delete=True)
    delta = _decode_delta(node, blobs, 0)
    decoded = len(steps)
    assert decoded >= 15  # one per STEP entries walked, whoever walks
    _plan(empty_node(), delta)
    assert len(steps) - decoded >= 15


def test_outside_the_daemon_a_worker_never_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loopfirst, "_installed", False)
    monkeypatch.setattr(loopfirst, "MAX_WAIT", 600.0)
    loopfirst._loop_asleep.clear()
    done: list[bool] = []

    def worker() -> None:
        with loopfirst.stepping_aside():
            loopfirst.yield_point()
        done.append(True)

    t = threading.Thread(target=worker)
    t.start()
    t.join(60)
    assert done == [True]


def test_a_saves_page_cuts_are_yield_points(installed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from autosaved.storage import prolly

    steps: list[int] = []
    real = Walked.on_step
    assert real is not None
    monkeypatch.setattr(Walked, "on_step", lambda: (steps.append(1), real()))
    items = [(f"k{i:06d}".encode(), b"v" * 20) for i in range(20 * loopfirst.STEP)]
    prolly.build(items, prolly.Params(), lambda digest, raw: None)
    assert len(steps) >= 15
