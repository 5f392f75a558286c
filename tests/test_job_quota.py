"""``quota.max_jobs`` and the per-owner job index (issue 19): creating a job, and a user's ``status`` and
``list``, cost the same however many jobs other users hold; jobs on disk that are not loaded still count;
a delete gives the slot back.

The cost is counted, never timed: every walk of the daemon's table of loaded jobs goes through the dict's
iteration, which the in-process tests count (the daemon's core, on a real store in a temp dir). The quota
rows run the real daemon over its ipc socket, restarted in between so the jobs are on disk only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, ItemsView, Iterator, KeysView, ValuesView
from pathlib import Path
from typing import Any

import anyio
import pytest

import autosaved
from autosaved.config import Config, PolicySettings, QuotaSettings
from autosaved.daemon.app import Daemon
from autosaved.daemon.jobs import Job, JobKey
from autosaved.daemon.rpc import Handlers, Reply, RpcRequest, finish
from autosaved.errors import QuotaExceeded
from autosaved.storage.wal import WalWriter
from autosaved.testing.private import PrivateDaemon

from .conftest import skip_or_fail
from .test_daemon_core import FakeClock, RecordingNotifier

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
        await measured("create first", _req("hello", A, job="a1"))
        await measured("create second", _req("hello", A, job="a2"))
        work["owner listings"] = daemon.table.names.listings - listings
        status = await measured("status", _req("status", A))
        assert [j["job"] for j in status.fields["jobs"]] == ["a1", "a2"]  # A's, never B's
        listed = await measured("list", _req("list", A))
        assert [j["job"] for j in listed.fields["jobs"]] == ["a1", "a2"]
        await measured("create third", _req("hello", A, job="a3"))
        with pytest.raises(QuotaExceeded, match="already has 3 jobs"):
            await measured("refused fourth", _req("hello", A, job="a4"))
        await measured("delete", _req("delete", A, job="a1"))
        await measured("create after delete", _req("hello", A, job="a4"))

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
