"""``quota.max_jobs`` and the per-owner job index (issue 19): creating a job, and a user's ``status`` and
``list``, cost the same however many jobs other users hold; jobs on disk that are not loaded still count;
a delete gives the slot back.

The cost is counted, never timed: every walk of the daemon's table of loaded jobs (and of the slot table's
clients) goes through the dict's iteration, which the in-process tests count (the daemon's core, on a real
store in a temp dir, real memfds). The quota rows run the real daemon over its ipc socket, restarted in
between so the jobs are on disk only.
"""

from __future__ import annotations

import fcntl
import inspect
import math
import os
import threading
from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgpack
import pytest
from anyio import wait_all_tasks_blocked

import autosaved
from autosaved.config import Config, PolicySettings, QuotaSettings
from autosaved.daemon.app import Daemon
from autosaved.daemon.fdserver import FdContext, FdServer
from autosaved.daemon.jobcount import JobNames
from autosaved.daemon.jobs import Job, JobKey
from autosaved.daemon.rpc import Handlers, Reply, RpcRequest, finish
from autosaved.daemon.runstate import RunState
from autosaved.daemon.slottable import SlotConn, SlotTable
from autosaved.daemon.wakeups import Wakeups
from autosaved.errors import NotFound, QuotaExceeded
from autosaved.storage.wal import WalWriter
from autosaved.testing.private import PrivateDaemon

from .conftest import skip_or_fail
from .test_daemon_core import FakeClock, RecordingNotifier, _update

A, B = 40001, 40002  # two users (root acts for them in the real-daemon tests: root itself is exempt)


class CountingJobs(dict[JobKey, Job]):
    """The daemon's job table, counting the entries every walk of it visits (lookups are free)."""

    visited = 0

    def __iter__(self) -> Iterator[JobKey]:
        self.visited += len(self)
        return super().__iter__()

    def keys(self) -> KeysView[JobKey]:
        self.visited += len(self)
        return super().keys()

    def values(self) -> ValuesView[Job]:
        self.visited += len(self)
        return super().values()

    def items(self) -> ItemsView[JobKey, Job]:
        self.visited += len(self)
        return super().items()


def _daemon(tmp_path: Path, max_jobs: int) -> tuple[Daemon, CountingJobs]:
    config = Config(address=f"ipc://{tmp_path}/d.sock", state_dir=tmp_path / "state", write_speed=100_000_000,
                    quota=QuotaSettings(max_jobs=max_jobs))
    daemon = Daemon(config, clock=FakeClock(), notifier=RecordingNotifier())
    old = daemon.table.jobs
    counting = CountingJobs()
    # Every holder of the table's dict (the daemon, its reports, the flush) gets the counting one.
    for holder in (daemon, daemon.table, daemon.reports.ctx, daemon.flush_ctx):
        for attr, value in vars(holder).items():
            if value is old:
                object.__setattr__(holder, attr, counting)
    return daemon, counting


def _hold(daemon: Daemon, owner: int, n: int) -> None:
    """``owner`` holds ``n`` loaded jobs (built as the table loads a new one, without n disk reads)."""
    for i in range(n):
        store = daemon.store.job(owner, f"j{i}")
        daemon.table.add(Job(owner=owner, name=f"j{i}", store=store, settings=PolicySettings(),
                             wal=WalWriter(store.log_dir), io_lock=anyio.Lock()))


def _req(op: str, owner: int, **fields: Any) -> RpcRequest:
    return RpcRequest(op=op, seq=1, header={"v": 1, "op": op, "seq": 1, **fields}, frames=[], owner=owner,
                      header_size=32)


async def call(handlers: Handlers, req: RpcRequest) -> Reply:
    return await finish(handlers.start(req))


def _work_of_a(tmp_path: Path, b_jobs: int) -> dict[str, int]:
    """What user A's requests visit of the job table while user B holds ``b_jobs`` loaded jobs."""
    daemon, jobs = _daemon(tmp_path, max_jobs=3)
    work: dict[str, int] = {}

    async def main() -> None:
        _hold(daemon, B, b_jobs)
        d = daemon.handlers

        async def measured(what: str, req: RpcRequest) -> Reply:
            before = jobs.visited
            reply = await call(d, req)
            work[what] = jobs.visited - before
            return reply

        listings = daemon.table.names.listings
        await measured("create first", _update("a1", {"w": 1}, seq=1, owner=A))
        await measured("create second", _update("a2", {"w": 1}, seq=1, owner=A))
        work["owner listings"] = daemon.table.names.listings - listings
        status = await measured("status", _req("status", A))
        assert [j["job"] for j in status.fields["jobs"]] == ["a1", "a2"]  # A's, never B's
        listed = await measured("list", _req("list", A))
        assert [j["job"] for j in listed.fields["jobs"]] == ["a1", "a2"]
        await measured("create third", _update("a3", {"w": 1}, seq=1, owner=A))
        with pytest.raises(QuotaExceeded, match="already has 3 jobs"):
            await measured("refused fourth", _update("a4", {"w": 1}, seq=1, owner=A))
        await measured("delete", _req("delete", A, job="a1"))
        await measured("create after delete", _update("a4", {"w": 1}, seq=1, owner=A))
        daemon.table.remove((A, "never-loaded"))  # nothing to let go: a no-op
        assert sorted(j.name for j in daemon.table.jobs_of(A)) == ["a2", "a3", "a4"]

    anyio.run(main)
    return work


def test_a_users_requests_cost_the_same_whatever_other_users_hold(tmp_path: Path) -> None:
    few = _work_of_a(tmp_path / "few", 5)
    many = _work_of_a(tmp_path / "many", 5000)
    assert few == many, (few, many)
    # Not one entry of the table walked: a job's creation counts from the owner's names (one listing of
    # A's own folder, once), status and list read A's jobs from the per-owner index.
    assert set(few.values()) <= {0, 1} and few["owner listings"] == 1, few


# -- the quota on the real daemon ---------------------------------------------------------------------


@pytest.fixture
def as_root() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root: root acts for two other uids (the quota exempts root itself)")


def _create(address: str, owner: int, job: str) -> None:
    with autosaved.Admin(address=address, owner=owner) as admin:
        admin.replace(job, {"w": b"x" * 100})  # an update that waits for its version


def test_max_jobs_counts_jobs_on_disk_and_a_delete_frees_a_slot(
    as_root: None, make_daemon: Callable[..., PrivateDaemon],
) -> None:
    config = '[policy]\nidle = "off"\ninterval = "off"\nmin_gap = "0s"\n[quota]\nmax_jobs = 2\n'
    daemon = make_daemon(config)
    _create(daemon.address, A, "one")
    _create(daemon.address, A, "two")
    _create(daemon.address, B, "one")  # another user's job counts for that user only
    daemon.stop()
    daemon.start()  # the jobs are now on disk only: nothing is loaded
    with pytest.raises(autosaved.AutosavedError, match=r"already has 2 jobs \(the limit is 2\)") as exc:
        _create(daemon.address, A, "three")
    assert exc.value.code == "quota"
    assert not (daemon.state_dir / "jobs" / str(A) / "three").exists()  # the refusal created nothing
    _create(daemon.address, B, "two")  # B is at 2 now; A's jobs do not count for B
    with autosaved.Admin(address=daemon.address, owner=A) as admin:
        assert admin.delete("one")["deleted_versions"] == 1
    _create(daemon.address, A, "three")  # the delete gave the slot back
    with pytest.raises(autosaved.AutosavedError, match="already has 2 jobs"):
        _create(daemon.address, A, "four")
    with autosaved.Admin(address=daemon.address, owner=A) as admin:
        assert sorted(j["job"] for j in admin.jobs()) == ["three", "two"]


# -- the job names' listing, raced by creates and deletes ----------------------------------------------


def test_changes_during_an_owners_first_listing_are_kept(tmp_path: Path) -> None:
    """A job created and one deleted while the owner's folder is being listed: the names end up exact."""
    listing_started, go_on = threading.Event(), threading.Event()

    def listed(owner: int) -> set[str]:
        seen = {"old", "doomed"}  # what the folder held when the listing read it
        listing_started.set()
        go_on.wait(10)
        return seen

    loaded: list[str] = ["new"]
    names = JobNames(listed, lambda owner: list(loaded))

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            result: list[set[str]] = []

            async def first() -> None:
                result.append(set(await names.of(A)))

            tg.start_soon(first)
            await anyio.to_thread.run_sync(listing_started.wait, 10)
            names.add(A, "new")  # the table took a new job in
            names.forget(A, "doomed")  # a delete removed a folder the listing had already seen
            names.forget(A, "back")
            names.add(A, "back")  # deleted and created again
            go_on.set()
        assert result == [{"old", "new", "back"}]
        assert await names.of(A) == {"old", "new", "back"} and names.listings == 1  # listed once
        names.forget(A, "old")
        assert await names.of(A) == {"new", "back"}
        names.add(B, "x")  # an owner nobody asked about yet: its listing will see the disk
        assert B not in names._names

    anyio.run(main)


def test_concurrent_first_updates_of_new_jobs_share_the_last_slot(tmp_path: Path) -> None:
    """Two first updates of different new names by one user, with one slot left: the check and the table
    taking the job in are separated by awaits (the owner's listing, the job's folder read in a thread), so
    both passed and the user had 2 jobs under max_jobs = 1. Now exactly one is created."""
    daemon, _ = _daemon(tmp_path, max_jobs=1)
    listing_started, go_on = threading.Event(), threading.Event()
    listed = daemon.table.names._listed

    def slow_listing(owner: int) -> set[str]:
        listing_started.set()
        go_on.wait(10)  # both requests wait for the owner's first listing, then check one after the other
        return listed(owner)

    daemon.table.names._listed = slow_listing
    outcomes: dict[str, str] = {}

    async def main() -> None:
        async def create(name: str) -> None:
            try:
                await call(daemon.handlers, _update(name, {"w": 1}, seq=1, owner=A))
                outcomes[name] = "created"
            except QuotaExceeded as exc:
                outcomes[name] = str(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(create, "a1")
            tg.start_soon(create, "a2")
            await anyio.to_thread.run_sync(listing_started.wait, 10)
            await wait_all_tasks_blocked()
            go_on.set()
        assert sorted(outcomes.values())[0] == "created", outcomes
        assert "already has 1 jobs (the limit is 1)" in sorted(outcomes.values())[1], outcomes
        assert len(daemon.table.jobs_of(A)) == 1 and len(await daemon.table.names.of(A)) == 1
        assert daemon.table.names._creating == {}  # nothing left counted as being created

    anyio.run(main)


# -- the slot table's totals --------------------------------------------------------------------------


class CountingConns(dict[str, SlotConn]):
    visited = 0

    def values(self) -> ValuesView[SlotConn]:
        self.visited += len(self)
        return super().values()

    def items(self) -> ItemsView[str, SlotConn]:
        self.visited += len(self)
        return super().items()

    def __iter__(self) -> Iterator[str]:
        self.visited += len(self)
        return super().__iter__()


def _memfd(size: int) -> int:
    fd = os.memfd_create("slot", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


def test_a_slot_request_costs_the_same_whatever_other_users_have_mapped(tmp_path: Path) -> None:
    """``quota.max_shm_bytes`` and the global cap read counters: adding a slot visits no other client, and
    the totals stay exact through add, drop and a connection's end."""
    slots = SlotTable(max_bytes=1 << 30)
    conns = CountingConns()
    slots.conns = conns
    config = Config(address=f"ipc://{tmp_path}/d.sock", state_dir=tmp_path, quota=QuotaSettings(max_shm_bytes=3 * 4096))
    server = FdServer(FdContext(config=lambda: config, slots=slots, boot="b", run=RunState(),
                                give_to_socket_group=lambda path: None, max_conns=lambda: 1024,
                                replies_held=lambda uid: 0))
    others = [slots.open(B, 100 + i) for i in range(2000)]
    for conn in others[:3]:
        assert slots.add(conn, 1, 4096, [_memfd(4096)])["ok"]
    mine = slots.open(A, 1)
    conns.visited = 0
    for slot in (1, 2, 3):
        reply = server._request(mine, msgpack.packb({"op": "add", "slot": slot, "size": 4096}), [_memfd(4096)])
        assert reply["ok"], reply
    refused = server._request(mine, msgpack.packb({"op": "add", "slot": 4, "size": 4096}), [_memfd(4096)])
    assert not refused["ok"] and "quota.max_shm_bytes" in refused["message"]
    assert slots.report()["slots"] == 6 and len(slots.live_mappings()) == 6
    assert conns.visited == 0  # not one other client's slots summed
    assert slots.mapped_bytes_of(A) == 3 * 4096 and slots.mapped_bytes_of(B) == 3 * 4096
    assert slots.mapped_bytes == 6 * 4096
    assert id(mine.slots[2]) in slots.live_mappings()
    server._request(mine, msgpack.packb({"op": "drop", "slot": 2}), [])
    assert slots.mapped_bytes_of(A) == 2 * 4096 and slots.report()["slots"] == 5
    slots.close(mine)
    for conn in others:
        slots.close(conn)
    assert slots.mapped_bytes == 0 and slots.report()["slots"] == 0 and not slots.live_mappings()
    assert slots.mapped_bytes_of(A) == slots.mapped_bytes_of(B) == 0


# -- the scheduler decides for the job that changed -----------------------------------------------------


def _save_work(tmp_path: Path, b_jobs: int) -> dict[str, int]:
    """What user A's explicit saves cost the scheduler while user B holds ``b_jobs`` loaded jobs."""
    daemon, jobs = _daemon(tmp_path, max_jobs=3)
    work: dict[str, int] = {}

    async def main() -> None:
        _hold(daemon, B, b_jobs)
        async with anyio.create_task_group() as tg:
            daemon._tg = tg
            tg.start_soon(daemon.scheduler.run)
            await wait_all_tasks_blocked()  # its first pass (every job, once) is over
            visited, decided = jobs.visited, daemon.scheduler.wakeups.decided
            d = daemon.handlers
            await call(d, _update("a1", {"w": 1}, seq=1, owner=A))  # a job exists from its first update
            assert (await call(d, _req("save", A, job="a1"))).fields == {"version": 1, "new": True}
            await call(d, _update("a1", {"w": 2}, seq=2, owner=A, wait="committed"))
            await wait_all_tasks_blocked()
            work["table entries visited"] = jobs.visited - visited
            work["decisions"] = daemon.scheduler.wakeups.decided - decided
            tg.cancel_scope.cancel()

    anyio.run(main)
    return work


def test_a_save_costs_the_scheduler_the_same_whatever_other_users_hold(tmp_path: Path) -> None:
    few = _save_work(tmp_path / "few", 5)
    many = _save_work(tmp_path / "many", 5000)
    assert few == many, (few, many)
    # Each pass decided for A's job alone (asked for, then its finished save): never a walk of the table.
    assert few["table entries visited"] == 0 and 1 <= few["decisions"] <= 6, few


def test_wakeups_keep_each_jobs_earliest_and_hand_out_only_what_is_due() -> None:
    w = Wakeups()
    assert w.take(0.0) is None and w.next_at() == math.inf  # the first pass: every job, then nothing
    w.at((A, "idle"), 10.0)
    w.at((A, "idle"), 12.0)  # an update moved its idle timer later: the earlier wake-up stays
    w.at((A, "soon"), 5.0)
    w.at((A, "soon"), 4.0)  # earlier: replaces the live one (the 5.0 entry is stale)
    assert w.next_at() == 4.0 and w.take(3.0) == []
    assert w.take(5.0) == [(A, "soon")] and w.next_at() == 10.0  # the stale 5.0 entry is skipped
    w.now((B, "asked"))
    assert w.next_at() == -math.inf and w.take(6.0) == [(B, "asked")]
    assert w.take(11.0) == [(A, "idle")] and w.next_at() == math.inf
    w.at((A, "x"), 1.0)
    w.every()
    assert w.take(0.0) is None and w.take(2.0) == []  # every job was decided: its old wake-ups are gone


def test_a_refused_first_update_gives_its_max_jobs_slot_back(tmp_path: Path) -> None:
    """A first update refused after the job quota's check (here: over quota.max_bytes) leaves no empty job
    behind (issue 22), and no name in the job count either: under max_jobs = 1 the next new job is
    accepted (the name kept the slot until a restart)."""
    config = Config(address=f"ipc://{tmp_path}/d.sock", state_dir=tmp_path / "state", write_speed=100_000_000,
                    quota=QuotaSettings(max_jobs=1, max_bytes=4096))
    daemon = Daemon(config, clock=FakeClock(), notifier=RecordingNotifier())

    async def main() -> None:
        with pytest.raises(QuotaExceeded, match="max_bytes"):
            await call(daemon.handlers, _update("big", {"w": "x" * 10_000}, seq=1, owner=A))
        assert daemon.table.jobs_of(A) == [] and await daemon.table.names.of(A) == set()
        await call(daemon.handlers, _update("small", {"w": 1}, seq=1, owner=A))
        assert [j.name for j in daemon.table.jobs_of(A)] == ["small"]

    anyio.run(main)


def test_a_delete_of_a_job_that_surely_does_not_exist_is_refused_without_a_task(tmp_path: Path) -> None:
    """A flood of deletes of random names (issue 19's hostile user) is refused where it is received: no
    task, lock or worker thread per request, once the owner's job names are known. Any doubt (names not
    listed yet, the job loaded, being created or being deleted) takes the full path."""
    daemon, _ = _daemon(tmp_path, max_jobs=10)

    async def main() -> None:
        d = daemon.handlers
        first = d.start(_req("delete", A, job="nope0"))  # A's names are not known yet: a look on disk
        assert inspect.iscoroutine(first)
        with pytest.raises(NotFound, match="nope0"):
            await finish(first)
        with pytest.raises(NotFound, match="nope1"):
            d.start(_req("delete", A, job="nope1"))  # now refused at once, with no coroutine to run
        assert daemon.table.locks_held() == 0
        await call(d, _update("a1", {"w": 1}, seq=1, owner=A))
        with daemon.table.names.creating(A, "c1"):
            pending = d.start(_req("delete", A, job="c1"))
            assert inspect.iscoroutine(pending)
            pending.close()
        async with daemon.table.key_lock((A, "k1")):
            pending = d.start(_req("delete", A, job="k1"))
            assert inspect.iscoroutine(pending)
            pending.close()
        loaded = d.start(_req("delete", A, job="a1"))
        assert inspect.iscoroutine(loaded)
        assert (await finish(loaded)).fields["job"] == "a1"
        with pytest.raises(NotFound, match="a1"):
            d.start(_req("delete", A, job="a1"))  # deleted: its name left the owner's set
        other = d.start(_req("delete", B, job="nope0"))  # B's names are their own, not known yet
        assert inspect.iscoroutine(other)
        with pytest.raises(NotFound):
            await finish(other)

    anyio.run(main)
