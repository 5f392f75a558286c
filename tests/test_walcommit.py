"""The log's group committer (issue 21): a log thread that answered its batch itself leaves the batch's
bookkeeping to the event loop's next request and wakes the loop itself only when none comes; a batch it
could not answer, or one that failed, wakes the loop at once. And a failed sync is never acknowledged,
whichever job's batch it hit while other jobs' batches sync beside it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
import pytest

import autosaved
from autosaved.codec import pack
from autosaved.daemon.walcommit import SyncThreads
from autosaved.storage.wal import FRAME_AHEAD, Record, WalWriter, coalesce, scan_segment, segments
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, wait_for


def test_coalesce_joins_small_pieces_and_keeps_large_ones_as_they_are() -> None:
    big = memoryview(bytearray(b"B" * 100))
    out = coalesce([b"ab", b"c", big, b"d", b"e" * 7], limit=10)
    assert [bytes(p) for p in out] == [b"abc", b"B" * 100, b"d" + b"e" * 7]
    assert out[1] is big  # a large blob is written from where it is, never copied
    assert [bytes(p) for p in coalesce([b"x" * 6, b"y" * 6, b"z"], limit=10)] == [b"x" * 6 + b"y" * 6, b"z"]


def _record(lsn: int, value: object) -> Record:
    return Record(lsn=lsn, sessions={"s": lsn}, step=None, meta={}, delta=pack({"v": value}))


def test_records_framed_ahead_carry_the_sync_marker_of_the_segment_they_land_in(tmp_path: Path) -> None:
    """Framed on the event loop, appended in a thread: a record framed for one state of the segment
    (synced through 1) but appended after the segment changed (a rotation) is framed again, so its marker
    never claims a sync its own segment did not have."""
    w = WalWriter(tmp_path / "log")
    w.append([_record(1, 1)])
    framed = w.frame([_record(2, 2)])
    assert framed is not None and framed.synced == 1
    w.append([_record(2, 2)], framed)
    stale = w.frame([_record(3, 3)])
    assert stale is not None and stale.synced == 2
    w.rotate()
    w.append([_record(3, 3)], stale)
    w.close()
    (_, first), (_, second) = segments(tmp_path / "log")
    assert [(r.lsn, r.synced, r.delta) for r in scan_segment(first).records] == [(1, 0, {"v": 1}), (2, 1, {"v": 2})]
    assert [(r.lsn, r.synced, r.delta) for r in scan_segment(second).records] == [(3, 0, {"v": 3})]
    # large blobs are framed by the append itself (checksumming them would hold up the event loop)
    assert w.frame([_record(4, np.zeros(FRAME_AHEAD + 1, np.uint8))]) is None


@pytest.mark.parametrize("answered", [True, False])
def test_a_finished_batch_reaches_the_event_loop_with_no_request_to_carry_it(answered: bool) -> None:
    """Nothing calls ``settle``: the thread's own wake-up (after its linger, or at once) must run ``done``."""
    async def main() -> None:
        threads = SyncThreads(threads=2)
        done = anyio.Event()
        seen: list[BaseException | None] = []
        loop_thread = threading.get_ident()
        ran_on: list[int] = []

        def finished(exc: BaseException | None) -> None:
            seen.append(exc)
            ran_on.append(threading.get_ident())
            done.set()

        threads.submit(lambda: answered, finished)
        with anyio.fail_after(30):
            await done.wait()
        assert seen == [None] and ran_on == [loop_thread]
    anyio.run(main)


def test_a_jobs_next_batch_goes_to_its_lingering_thread_and_no_batch_waits_while_a_thread_is_free() -> None:
    """A job's batches stay on the thread that ran its last one while that thread lingers idle (they no
    longer go round every thread, each waking the loop when its linger ran out); a batch preferring a
    busy thread runs on another one at once."""
    async def main() -> None:
        threads = SyncThreads(threads=2, linger=3600.0)
        ran_on: list[int | None] = []

        async def run(prefer: int | None, work: Callable[[], bool] | None = None) -> int | None:
            finished = anyio.Event()

            def record() -> bool:
                ran_on.append(threads.current())
                return True if work is None else work()

            threads.submit(record, lambda exc: finished.set(), prefer=prefer)
            with anyio.fail_after(30):
                while not finished.is_set():
                    threads.settle()
                    await anyio.sleep(0.001)
            return ran_on[-1]

        first = await run(None)
        assert first is not None
        for _ in range(20):
            assert await run(first) == first  # it lingers idle after each: the job stays there
        # That thread is busy with another job's slow sync: the job's next batch does not wait for it.
        release = threading.Event()
        busy = threading.Event()

        def slow() -> bool:
            busy.set()
            return release.wait(30)

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, first, slow)
            await anyio.to_thread.run_sync(busy.wait, 30)
            other = await run(first)
            assert other is not None and other != first
            release.set()
        # Every thread lingers for its job (for an hour here): a new job's batch is still taken at once, by
        # one of them, and work beyond the threads waits for the first one free, in order.
        ran_on.clear()
        assert {await run(first), await run(other)} == {first, other}
        for _ in range(3):
            assert await run(None) in (first, other)
        # Both threads busy: more work waits, and is taken as they finish.
        gate = threading.Event()
        holding = [threading.Event(), threading.Event()]
        ran: list[int] = []
        finished: list[BaseException | None] = []

        def hold(i: int) -> Callable[[], bool]:
            def run() -> bool:
                holding[i].set()
                return gate.wait(30)
            return run

        for i in range(2):
            threads.submit(hold(i), finished.append)
        for event in holding:
            await anyio.to_thread.run_sync(event.wait, 30)
        def note(n: int) -> Callable[[], bool]:
            def run() -> bool:
                ran.append(n)
                return True
            return run

        for n in (1, 2, 3):
            threads.submit(note(n), finished.append)
        assert ran == []  # no thread was free
        gate.set()
        with anyio.fail_after(30):
            while len(finished) < 5:
                threads.settle()
                await anyio.sleep(0.001)
        assert sorted(ran) == [1, 2, 3] and finished == [None] * 5
    anyio.run(main)


def test_work_queued_behind_an_answered_batch_wakes_the_loop_at_once() -> None:
    """A job's second writer's record waits for the first batch's ``done`` to start its own: a thread whose
    batch answered everything still wakes the loop at once when ``more()`` says so, instead of lingering
    (measured before: the second of two concurrent ``logged`` updates to one job waited for the linger,
    slower-of-the-pair p50 2.0-3.4 ms against 1.2-1.4 ms now; scripts in the closing note of issue 21)."""
    async def main() -> None:
        threads = SyncThreads(threads=1, linger=3600.0)  # lingering, it would wake the loop in an hour
        done = anyio.Event()
        threads.submit(lambda: True, lambda exc: done.set(), more=lambda: True)
        with anyio.fail_after(30):
            await done.wait()  # nothing calls settle here
    anyio.run(main)


def test_a_failed_batch_hands_its_error_to_the_event_loop() -> None:
    async def main() -> None:
        threads = SyncThreads(threads=1)
        done = anyio.Event()
        seen: list[BaseException | None] = []

        def fail() -> bool:
            raise OSError(5, "Input/output error")

        def finished(exc: BaseException | None) -> None:
            seen.append(exc)
            done.set()

        threads.submit(fail, finished)
        with anyio.fail_after(30):
            await done.wait()
        assert isinstance(seen[0], OSError) and seen[0].errno == 5
    anyio.run(main)


def test_settle_runs_what_the_threads_left_in_the_callers_step() -> None:
    """A request's ``settle`` runs the bookkeeping of a batch already answered, before the linger ends."""
    async def main() -> None:
        threads = SyncThreads(threads=1, linger=3600.0)  # the thread would wait an hour to wake the loop
        synced = threading.Event()
        seen: list[BaseException | None] = []

        def work() -> bool:
            synced.set()
            return True

        threads.submit(work, seen.append)
        await anyio.to_thread.run_sync(synced.wait, 30)
        with anyio.fail_after(30):
            while not seen:  # the completion is appended right after ``work`` returns
                threads.settle()
                await anyio.sleep(0.001)
        assert seen == [None]
    anyio.run(main)


def test_a_failed_sync_of_one_job_is_never_acked_while_another_jobs_batch_syncs(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    """Two jobs log side by side; the first fdatasync after the fault is armed fails with EIO. The update
    in that batch gets an error (never a ``logged`` ack), the other job's update is acked, and after a
    SIGKILL every acked value is read back."""
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    results: dict[str, object] = {}
    with autosaved.Client("one", address=d.address) as one, autosaved.Client("two", address=d.address) as two:
        one.update({"v": 0}, wait="logged")
        two.update({"v": 0}, wait="logged")
        faults.write_text("wal.fsync.before 1 eio\n")
        start = threading.Barrier(2)

        def send(name: str, client: autosaved.Client) -> None:
            start.wait()
            try:
                results[name] = client.update({"v": 1}, wait="logged")
            except autosaved.StorageError as exc:
                results[name] = exc

        workers = [threading.Thread(target=send, args=(n, c)) for n, c in (("one", one), ("two", two))]
        for t in workers:
            t.start()
        for t in workers:
            t.join(60)
        failed = [n for n, r in results.items() if isinstance(r, autosaved.StorageError)]
        assert len(failed) == 1, results
        assert "could not log" in str(results[failed[0]])
        acked = "two" if failed == ["one"] else "one"
        assert not isinstance(results[acked], Exception)
        # the failed job saves a snapshot instead of trusting its log; the other logs on as before
        client = one if failed == ["one"] else two
        wait_for(lambda: client.status()["wal_error"] is None and client.status()["latest_version"] == 1)
        (two if acked == "two" else one).update({"v": 2}, wait="logged")
    d.kill()
    assert autosaved.restore(acked, state_dir=d.state_dir) == {"v": 2}
    assert autosaved.restore(failed[0], state_dir=d.state_dir) == {"v": 1}  # the snapshot saved it
