"""The lazy snapshot mode's contract, against a real daemon: ``update()`` returns before the copy, the
fence (or the optimizer hook) waits for it, and the acknowledged bytes are those from before any
mutation made after the fence."""

from __future__ import annotations

import signal

import numpy as np
import pytest

from autosaved import Client, DaemonUnavailable, LazyClient
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY

BIG = 8 * 1024 * 1024 // 4  # float32s: 8 MiB, through a shared-memory slot
SMALL = 256  # 1 KiB: inline in the ZeroMQ message


def test_mutation_after_fence_does_not_reach_the_acked_bytes(make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon: PrivateDaemon = make_daemon(NO_AUTO_POLICY)
    rng = np.random.default_rng(0)
    big, small = rng.random(BIG, dtype=np.float32), rng.random(SMALL, dtype=np.float32)
    with LazyClient(Client("lazy", address=daemon.address)) as lz:
        for step in range(3):  # several updates in a row stay in order; each is mutated after its fence
            big_before, small_before = big.copy(), small.copy()
            meta = {"stage": f"s{step}"}
            pending = lz.update({"big": big, "small": small, "step": step}, step=step, meta=meta, wait="logged")
            meta["stage"] = "changed"  # not an array: captured at update() already
            lz.fence()
            big += 1.0
            small += 1.0
            ack = pending.result()
            assert ack.level == "logged"
    # The daemon dies without a snapshot: only the log has the update, with the bytes from the fence.
    daemon.stop(signal.SIGKILL)
    daemon.start()
    with Client("lazy", address=daemon.address) as c:
        state = c.restore()
    assert state["step"] == 2
    np.testing.assert_array_equal(state["big"], big_before)
    np.testing.assert_array_equal(state["small"], small_before)
    assert not np.array_equal(state["big"], big)


def test_optimizer_hook_lets_no_step_slip_in_before_the_copy(daemon: PrivateDaemon) -> None:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 2048)  # 16 MiB of weights: a copy long enough for a step to race it
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    x = torch.randn(4, 2048)
    model(x).pow(2).mean().backward()
    opt.step()  # optimizer state exists
    with LazyClient(Client("hooked", address=daemon.address)) as lz:
        handle = lz.hook_optimizer(opt)
        model(x).pow(2).mean().backward()  # gradients ready: the next step could start at once
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        pending = lz.update({"model": model.state_dict(), "optim": opt.state_dict()})
        opt.step()  # the hook fences first: the step waits for the copy, then mutates
        assert pending.copied.is_set()
        pending.result()
        handle.remove()
        restored = lz.restore(tensors="torch")
    for k, v in expected.items():
        assert torch.equal(restored["model"][k], v), k
    assert not torch.equal(restored["model"]["weight"], model.weight.detach())  # the step did change it


def test_a_background_failure_is_raised_not_dropped(make_daemon) -> None:  # type: ignore[no-untyped-def]
    daemon: PrivateDaemon = make_daemon(NO_AUTO_POLICY)
    lz = LazyClient(Client("gone", address=daemon.address, timeout=2))
    lz.client.connect()
    daemon.stop()  # the daemon is gone before the update is sent
    pending = lz.update({"w": np.ones(SMALL)})
    with pytest.raises(DaemonUnavailable):
        lz.wait()
    assert pending.future.exception() is not None
    lz.close()


def test_a_fence_copies_the_rest_of_the_update_itself() -> None:
    """The bulk copy is shared: pieces a fencing caller takes are copied in its thread, and the background
    thread's wait returns once every piece is in (issue 21: what is left at the fence runs at the
    trainer's priority, as an eager update would)."""
    import threading

    from autosaved.client.slotcopy import PIECE, SharedCopy

    rng = np.random.default_rng(0)
    src = rng.integers(0, 255, 5 * PIECE + 123, dtype=np.uint8)
    small = rng.integers(0, 255, 10, dtype=np.uint8)
    dst, dst_small = np.zeros_like(src), np.zeros_like(small)
    shared = SharedCopy([(dst, src), (dst_small, small)])
    background = threading.Thread(target=shared.wait)
    shared.work()  # the caller fenced first and took every piece
    assert shared.done.is_set()
    background.start()
    background.join(30)
    assert not background.is_alive() and np.array_equal(dst, src) and np.array_equal(dst_small, small)


def test_the_background_copy_runs_at_the_lowest_priority(daemon: PrivateDaemon) -> None:
    import os
    import threading

    from autosaved.client.lazy import BACKGROUND_NICE

    with LazyClient(Client("prio", address=daemon.address)) as lazy:
        nice = lazy._copier.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        sender = lazy._worker.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert nice == BACKGROUND_NICE and sender != BACKGROUND_NICE  # the copy yields; picking a slot does not
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != BACKGROUND_NICE  # the caller's own


def test_helpers_copy_a_waited_for_copy_beside_the_caller() -> None:
    """client/slotcopy.py: a copy the trainer waits for is shared with helper threads (its compute threads
    are idle then). The caller takes no piece here, so the helpers alone must finish it exactly."""
    from autosaved.client.slotcopy import PARALLEL_MIN, PIECE, SharedCopy, assist, copy_waited, helper_count

    rng = np.random.default_rng(2)
    src = rng.integers(0, 255, PARALLEL_MIN + 3 * PIECE + 17, dtype=np.uint8)
    dst = np.zeros_like(src)
    shared = SharedCopy([(dst, src)])
    if helper_count() == 0:  # one core: nobody to help, the caller copies alone
        assist(shared)
        assert shared.untaken() > 0
        shared.work()
    else:
        assist(shared)
        assert shared.done.wait(60), "the helpers did not copy"
    shared.wait()
    np.testing.assert_array_equal(dst, src)
    small = rng.integers(0, 255, PIECE, dtype=np.uint8)
    into = np.zeros_like(small)
    alone = SharedCopy([(into, small)])
    assist(alone)  # below PARALLEL_MIN: not worth waking a helper
    assert alone.untaken() == 1
    copy_waited([(dst, src[::-1].copy()), (into, small)])
    np.testing.assert_array_equal(dst, src[::-1])
    np.testing.assert_array_equal(into, small)


def test_a_forked_child_copies_with_helpers_of_its_own() -> None:
    """A DataLoader worker forked after the helpers started inherits none of their threads: its copies get
    a pool of their own (work queued on the parent's would never run and would pin its arrays)."""
    import os

    from autosaved.client import slotcopy

    if slotcopy.helper_count() == 0:
        return  # one core: no helpers in parent or child
    src = np.arange(slotcopy.PARALLEL_MIN * 2, dtype=np.uint8)
    dst = np.zeros_like(src)
    slotcopy.copy_waited([(dst, src)])  # the parent's pool exists now
    assert slotcopy._helpers is not None
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        ok = False
        try:
            into = np.zeros_like(src)
            slotcopy.copy_waited([(into, src)])
            pool = slotcopy._helpers
            ok = (pool is not None and np.array_equal(into, src)
                  and all(t.is_alive() for t in pool._threads))  # type: ignore[attr-defined]
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_with_no_spare_core_the_copy_waits_for_the_fence(daemon: PrivateDaemon, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 21: with every core busy with the caller's compute threads, an overlapped copy cost the
    trainer more than copying at the fence (lazy 1.5-1.6x no checkpoint, eager 1.1-1.2x). With no core
    to spare, no piece is copied before the fence, and the fence copies all of it on the caller's side."""
    from autosaved.client import lazy as lazy_module
    from autosaved.client.slotcopy import PIECE

    monkeypatch.setattr(lazy_module, "cores", lambda: 1)  # the caller's own thread fills the only core
    rng = np.random.default_rng(3)
    big = rng.random(BIG, dtype=np.float32)
    expected = big.copy()
    with LazyClient(Client("at-fence", address=daemon.address)) as lz:
        assert lz.copy_at() == "fence"
        pending = lz.update({"big": big}, step=1)
        assert pending.ready.wait(60), "the background thread never reached the copy"
        shared = pending.copy
        assert shared is not None
        assert shared.untaken() == -(-big.nbytes // PIECE)  # nothing copied behind the caller's back
        assert not pending.copied.is_set() and not pending.future.done()
        lz.fence()  # copies it all here
        assert pending.copied.is_set() and shared.untaken() == 0
        big += 1.0
        assert pending.result().level == "accepted"
        assert lz.background_copies == 0  # the background copier never ran
        state = lz.restore()
    np.testing.assert_array_equal(state["big"], expected)


def test_with_a_spare_core_the_copy_overlaps_without_a_fence(daemon: PrivateDaemon, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from autosaved.client import lazy as lazy_module

    monkeypatch.setattr(lazy_module, "cores", lambda: 64)
    big = np.arange(BIG, dtype=np.float32)
    with LazyClient(Client("overlap", address=daemon.address)) as lz:
        assert lz.copy_at() == "overlap"
        pending = lz.update({"big": big}, step=1)
        assert pending.copied.wait(60), "the background thread did not copy"  # no fence was called
        assert pending.future.result(60).level == "accepted"
        assert lz.background_copies == 1
        np.testing.assert_array_equal(lz.restore()["big"], big)


def test_an_update_nobody_fences_is_still_copied_and_sent(daemon: PrivateDaemon, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A copy left for the fence runs in the background once no fence came in time (the last update
    before a caller exits, or one that never fences): it is never held back for good."""
    from autosaved.client import lazyplan

    monkeypatch.setattr(lazyplan, "FIRST_WAIT", 0.05)
    big = np.arange(BIG, dtype=np.float32)
    with LazyClient(Client("unfenced", address=daemon.address), overlap=False) as lz:
        pending = lz.update({"big": big}, step=1)
        assert pending.future.result(60).level == "accepted"  # the future itself: result() would fence
        assert pending.copied.is_set() and not pending.fencing.is_set() and lz.background_copies == 1
        np.testing.assert_array_equal(lz.restore()["big"], big)


def test_an_update_without_arrays_fences_at_once(daemon: PrivateDaemon) -> None:
    with LazyClient(Client("scalars", address=daemon.address), overlap=False) as lz:
        pending = lz.update({"step": 3, "note": "no arrays"}, step=3)
        lz.fence(60)
        assert pending.result(60).level == "accepted" and lz.background_copies == 0
        assert lz.restore()["step"] == 3
