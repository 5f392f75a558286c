"""The daemon's core in process, without a subprocess or a socket: the job table, the writer, rpc dispatch
through the request registry, and the deadline flush wired to a fake clock and a recording notifier.

Everything here is the real code on a real store in a temp dir; only time (the clock the policy and the
retry backoff read) and systemd (the notifier) are stand-ins, as ``Daemon(clock=, notifier=)`` allows.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from autosaved.codec import pack
from autosaved.config import Config, PolicySettings
from autosaved.daemon.app import Daemon
from autosaved.daemon.flush import FlushContext, flush_all, to_write
from autosaved.daemon.jobs import Job
from autosaved.daemon.jobtable import JobTable
from autosaved.daemon.notify import Notifier
from autosaved.daemon.rpc import REGISTRY, Handlers, Reply, RpcRequest, finish
from autosaved.daemon.runstate import Phase
from autosaved.daemon.writer import Writer
from autosaved.errors import Forbidden, InvalidJobName, NotFound, ProtocolError, ShuttingDown
from autosaved.policy import SaveReason
from autosaved.protocol import OP_TABLE, OPS, Access, blob_descriptors, check_request, is_long
from autosaved.storage.local import Store
from autosaved.tree import to_node

UID = os.geteuid()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingNotifier(Notifier):
    """systemd's side of sd_notify, in a list."""

    def __init__(self) -> None:
        super().__init__(address="")
        self.sent: list[tuple[str, Any]] = []

    def status(self, status: str) -> None:
        self.sent.append(("status", status))

    def stopping(self, status: str) -> None:
        self.sent.append(("stopping", status))

    def extend_timeout(self, seconds: float) -> None:
        self.sent.append(("extend_timeout", seconds))


def _config(tmp_path: Path, **kw: Any) -> Config:
    return Config(address=f"ipc://{tmp_path}/d.sock", state_dir=tmp_path / "state", write_speed=100_000_000, **kw)


def _update(job: str, state: dict[str, Any], *, seq: int, owner: int = UID, wait: str = "accepted",
            extra: dict[str, Any] | None = None) -> RpcRequest:
    node, blobs = to_node(pack(state))
    header = {"v": 1, "op": "update", "seq": seq, "job": job, "session": "s1", "tree": node,
              "blobs": blob_descriptors(blobs), "wait": wait, **(extra or {})}
    frames = [memoryview(b.data) for b in blobs if b.data is not None]
    return RpcRequest(op="update", seq=seq, header=header, frames=frames, owner=owner, header_size=64)


def _req(op: str, *, seq: int = 1, owner: int = UID, **fields: Any) -> RpcRequest:
    return RpcRequest(op=op, seq=seq, header={"v": 1, "op": op, "seq": seq, **fields}, frames=[], owner=owner,
                      header_size=32)


# -- the request registry ---------------------------------------------------------------------------------


def test_the_registry_declares_every_wire_op_once() -> None:
    assert set(REGISTRY) == OPS == set(OP_TABLE)
    for name, op in REGISTRY.items():
        assert op.spec is OP_TABLE[name] and callable(op.handler)
    # the ops that wait for a save are the long ones (update only when it waits for one); ping is the
    # only one that touches no job
    # (hello too: it may load the job and replay its log first)
    assert {n for n in OPS if is_long(n, {})} == {"hello", "save", "restore", "verify", "gc", "delete"}
    assert [is_long("update", {"wait": w}) for w in ("accepted", "logged", "committed", "replicated")] == [
        False, False, True, True]
    assert {n for n, spec in OP_TABLE.items() if spec.access is Access.ANY_PEER} == {"ping"}


async def call(handlers: Handlers, req: RpcRequest) -> Reply:
    """A request through the daemon's own path: ``Handlers.start`` (what the rpc loop calls), then its reply."""
    return await finish(handlers.start(req))


def test_dispatch_runs_the_registered_handlers_on_the_job_table(tmp_path: Path) -> None:
    daemon = Daemon(_config(tmp_path), clock=FakeClock(), notifier=RecordingNotifier())

    async def main() -> None:
        d = daemon.handlers
        assert (await call(d, _req("ping"))).fields == {"pid": os.getpid()}
        hello = await call(d, _req("hello", job="core"))
        assert hello.fields["latest_version"] is None and hello.fields["durable"] == 0
        reply = await call(d, _update("core", {"w": np.arange(4, dtype=np.int64), "step": 3}, seq=1))
        assert reply.fields["ack"] == "accepted"
        job = daemon.table.jobs[(UID, "core")]
        assert job.dirty and job.sessions == {"s1": 1}
        status = await call(d, _req("status", job="core"))
        assert status.fields["live"] is True and status.fields["dirty"] is True
        # another owner's job: only root may name one
        if UID != 0:
            with pytest.raises(Forbidden):
                await call(d, _req("status", job="core", owner=UID + 1))
        with pytest.raises(NotFound):
            await call(d, _req("status", job="nope"))
        with pytest.raises(InvalidJobName):
            await call(d, _req("hello", job="../escape"))
        daemon.run_state.phase = Phase.FLUSHING  # what SIGTERM's flush sets first
        with pytest.raises(ShuttingDown):
            await call(d, _update("core", {"step": 4}, seq=2))

    anyio.run(main)


def test_an_op_missing_from_the_wire_list_is_refused_before_dispatch() -> None:
    with pytest.raises(ProtocolError) as exc:
        check_request({"v": 1, "op": "op_update", "seq": 1})
    assert exc.value.details.get("code") == "unknown_op"


# -- the job table and the writer -----------------------------------------------------------------------


def _writer(chunk_size: Callable[[], int], clock: Callable[[], float], done: Callable[[], None]) -> Writer:
    return Writer(chunk_size=chunk_size, clock=clock, on_done=done)


def test_the_job_table_loads_what_the_writer_committed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    clock = FakeClock()
    pokes: list[int] = []
    chunk = [1 << 20]

    async def main() -> None:
        table = JobTable(store, policy=PolicySettings, clock=clock, poke=lambda job: pokes.append(1))
        assert await table.find(UID, "j") is None  # nothing on disk: not created by a read
        job = await table.get(UID, "j")
        assert await table.get(UID, "j") is job and table.jobs == {(UID, "j"): job}
        big = np.random.default_rng(1).integers(0, 255, 64 * 1024, dtype=np.uint8)
        job.apply(pack({"w": big}), session="s", seq=1, step=1, meta=None, size=big.nbytes, now=clock())
        saved = anyio.Event()
        writer = _writer(lambda: chunk[0], clock, saved.set)
        async with anyio.create_task_group() as tg:
            writer.begin(job, SaveReason.EXPLICIT, tg)
        assert job.latest_version == 1 and not job.dirty
        # the chunk size is read from the live config at each save: a reload applies to the next one
        chunk[0] = 4096
        job.apply(pack({"w": big[::-1].copy()}), session="s", seq=2, step=2, meta=None, size=big.nbytes, now=clock())
        async with anyio.create_task_group() as tg:
            writer.begin(job, SaveReason.EXPLICIT, tg)
        assert job.latest_version == 2
        chunks = [len(store.job(UID, "j").read_manifest(v)["blobs"][0]["chunks"]) for v in (1, 2)]
        assert chunks == [1, 16]
        # a fresh table (a restart) loads the newest version from disk
        again = JobTable(store, policy=PolicySettings, clock=clock, poke=lambda job: None)
        loaded = await again.find(UID, "j")
        assert loaded is not None and loaded.latest_version == 2 and loaded.step == 2 and not loaded.dirty
        assert loaded.next_version == 3

    anyio.run(main)


# -- the deadline flush -----------------------------------------------------------------------------------


def _flush_rig(tmp_path: Path, clock: FakeClock, notifier: RecordingNotifier, deadline: float,
               tg: anyio.abc.TaskGroup) -> tuple[FlushContext, dict[tuple[int, str], Job], list[str]]:
    store = Store(tmp_path)
    jobs: dict[tuple[int, str], Job] = {}
    order: list[str] = []
    waiters: list[anyio.Event] = []

    def done() -> None:
        for w in waiters:
            w.set()
        waiters.clear()

    async def wait_save_done(timeout: float) -> None:
        event = anyio.Event()
        waiters.append(event)
        with anyio.move_on_after(timeout):
            await event.wait()

    writer = _writer(lambda: 1 << 20, clock, done)
    writer.on_commit = lambda job, _v, _w: order.append(job.name)
    config = Config(address="ipc:///unused", state_dir=tmp_path, shutdown_deadline=deadline)
    ctx = FlushContext(config=lambda: config, jobs=jobs, writer=writer, clock=clock, notifier=notifier,
                       replicator=None, begin_save=lambda job, reason: writer.begin(job, reason, tg),
                       wait_save_done=wait_save_done)
    for name, size in (("big", 300_000), ("small", 1_000), ("mid", 50_000)):
        job = Job(owner=UID, name=name, store=store.job(UID, name), settings=PolicySettings())
        job.apply(pack({"x": np.zeros(size, dtype=np.uint8)}), session="s", seq=1, step=1, meta=None, size=size,
                  now=clock())
        jobs[job.key] = job
    return ctx, jobs, order


def test_the_flush_commits_every_dirty_job_smallest_first_and_tells_systemd(tmp_path: Path) -> None:
    clock, notifier = FakeClock(), RecordingNotifier()
    out: dict[str, Any] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            ctx, jobs, order = _flush_rig(tmp_path, clock, notifier, 30.0, tg)
            out["missed"] = await flush_all(ctx, SaveReason.SHUTDOWN)
            out["order"], out["versions"] = order, {k[1]: j.latest_version for k, j in jobs.items()}

    anyio.run(main)
    assert out["missed"] == []
    assert out["order"] == ["small", "mid", "big"]  # all fit: run smallest first
    assert out["versions"] == {"big": 1, "small": 1, "mid": 1}
    kinds = [k for k, _ in notifier.sent]
    assert notifier.sent[0] == ("stopping", "shutdown: saving 3 dirty jobs within 30s")
    assert ("status", "shutdown: 3/3 jobs saved") in notifier.sent
    assert kinds.count("extend_timeout") >= 2  # at the start and after each commit


def test_the_flush_plans_a_small_state_updated_often_by_its_size_not_by_its_updates(tmp_path: Path) -> None:
    """Dirty bytes count every update: a small state updated often is planned by what its save writes (at
    most the state), so it is saved before bigger jobs, not after them (issue 19: a well-behaved user's
    job was left unsaved behind a hostile user's)."""
    clock, notifier = FakeClock(), RecordingNotifier()
    out: dict[str, Any] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            ctx, jobs, order = _flush_rig(tmp_path, clock, notifier, 30.0, tg)
            small = jobs[(UID, "small")]
            for seq in range(2, 400):
                small.apply(pack({"x": np.full(1_000, seq % 256, dtype=np.uint8)}), session="s", seq=seq, step=seq,
                            meta=None, size=1_000, now=clock())
            out["dirty"] = {k[1]: j.dirty_bytes for k, j in jobs.items()}
            out["missed"] = await flush_all(ctx, SaveReason.SHUTDOWN)
            out["order"] = order

    anyio.run(main)
    assert out["dirty"]["small"] > out["dirty"]["big"], out
    assert out["missed"] == []
    assert out["order"] == ["small", "mid", "big"]
    assert to_write(400_000, 1_100) == 1_100 and to_write(5_000, 1_100_000) == 5_000


def test_the_flush_does_not_wait_for_background_saves_of_other_jobs(tmp_path: Path) -> None:
    """Background saves of two big jobs hold every background slot of the writer and do not end; the flush
    saves the small job at once (slots of its own, and no wait for saves it did not start), then waits for
    them. Before, a well-behaved user's job waited behind a hostile user's saves and missed the deadline."""
    clock, notifier = FakeClock(), RecordingNotifier()
    out: dict[str, Any] = {}
    release = threading.Event()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            ctx, jobs, order = _flush_rig(tmp_path, clock, notifier, 60.0, tg)
            for name in ("big", "mid"):
                job = jobs[(UID, name)]
                real = job.store.write_version

                def held(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                    release.wait(120)
                    return _real(*args, **kwargs)

                job.store.write_version = held  # type: ignore[method-assign]
                ctx.writer.begin(job, SaveReason.IDLE, tg)

            async def release_after_small() -> None:
                while "small" not in order:
                    await anyio.sleep(0.01)
                out["saving_when_small_committed"] = sorted(j.name for j in jobs.values() if j.saving)
                release.set()

            tg.start_soon(release_after_small)
            with anyio.move_on_after(60):
                out["missed"] = [j.name for j in await flush_all(ctx, SaveReason.SHUTDOWN)]
            release.set()
            out["order"] = order

    anyio.run(main)
    assert out.get("saving_when_small_committed") == ["big", "mid"], out
    assert out["missed"] == [] and out["order"][0] == "small", out


def test_a_job_waiting_for_its_retry_is_reported_missed_at_the_deadline(tmp_path: Path) -> None:
    clock, notifier = FakeClock(), RecordingNotifier()
    out: dict[str, Any] = {}

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            # a deadline long enough for two tiny saves on a slow disk: the missed job waits it out
            ctx, jobs, order = _flush_rig(tmp_path, clock, notifier, 8.0, tg)
            # its last save failed; by the (fake) clock the retry is far away, past the deadline
            jobs[(UID, "mid")].retry_at = clock() + 3600
            out["missed"] = [j.name for j in await flush_all(ctx, SaveReason.SHUTDOWN)]
            out["order"] = order

    anyio.run(main)
    assert out["missed"] == ["mid"]
    assert out["order"] == ["small", "big"]
    assert notifier.sent[-1] == ("status", "shutdown: 1 of 3 dirty jobs NOT saved before the deadline: mid")



def test_requests_for_jobs_that_do_not_exist_leave_no_lock_behind(tmp_path: Path) -> None:
    """Issue 19, defect 9: every ``delete`` of a random name used to leave a lock in the table for ever."""
    daemon = Daemon(_config(tmp_path), clock=FakeClock(), notifier=RecordingNotifier())

    async def main() -> None:
        d = daemon.handlers
        for i in range(500):
            with pytest.raises(NotFound):
                await call(d, _req("delete", job=f"nope{i}"))
            with pytest.raises(NotFound):
                await call(d, _req("gc", job=f"nope{i}"))
        assert daemon.table.locks_held() == 0
        # A loaded job pins its io lock until it is deleted; then nothing is left.
        await call(d, _update("real", {"x": 1}, seq=1))
        await call(d, _req("gc", job="real"))
        assert daemon.table.locks_held() == 1
        await call(d, _req("delete", job="real"))
        assert daemon.table.locks_held() == 0 and not daemon.table.jobs

    anyio.run(main)


def test_keyed_turns_go_in_arrival_order_and_leave_nothing_behind() -> None:
    """The per-key queue that keeps updates of a loading job in arrival order (rpcupdate.py): turns go
    first come, first served whatever order their tasks wake in, a key stays busy until its last turn is
    done, a turn cancelled while waiting is dropped from the queue, and an idle key holds nothing."""
    from autosaved.daemon.keylocks import KeyedTurns, Turn

    async def main() -> list[int]:
        turns: KeyedTurns[str] = KeyedTurns()
        order: list[int] = []
        taken = [turns.take("k") for _ in range(5)]
        assert turns.busy("k") and not turns.busy("other") and taken[0].ready and not taken[1].ready

        async def run(i: int, turn: Turn) -> None:
            try:
                await turn.wait()
                order.append(i)
            finally:
                turns.done("k", turn)

        async with anyio.create_task_group() as tg:
            for i in (4, 2, 3, 1):  # their tasks start in another order than their turns were taken
                tg.start_soon(run, i, taken[i])
            with anyio.CancelScope() as scope:
                scope.cancel()
                await run(99, turns.take("k"))  # cancelled while waiting: leaves the queue
            await anyio.sleep(0)
            assert turns.busy("k")
            tg.start_soon(run, 0, taken[0])
        assert not turns.busy("k") and len(turns) == 0
        return order

    assert anyio.run(main) == [0, 1, 2, 3, 4]


def test_a_save_gets_the_paths_changed_since_the_stores_tree_even_after_a_failed_save(tmp_path: Path) -> None:
    """The job records the paths its updates change (issue 20) and each snapshot hands them to the store
    with the version they are relative to; a failed save gives its paths back to the next one, whose root
    is then the one a build from scratch of the same state gives."""
    from autosaved.daemon.jobs import commit_failed, commit_succeeded, take_snapshot
    from autosaved.errors import StorageError
    from autosaved.storage.local import JobStore

    def store(path: Path) -> JobStore:
        js = JobStore(path, UID, "t")
        js.write_format = 2
        return js

    js = store(tmp_path / "daemon")
    job = Job(owner=UID, name="t", store=js, settings=PolicySettings())

    def update(delta: dict[str, Any]) -> None:
        job.apply(pack(delta), session="s", seq=job.generation + 1, step=None, meta=None, size=1, now=0.0)

    def save(fail: bool = False) -> Any:
        ticket = take_snapshot(job, SaveReason.EXPLICIT, 0.0)
        if fail:
            commit_failed(ticket, StorageError("disk full"), 0.0)
        else:
            js.write_version(ticket.root, version=ticket.version, step=None, reason="t", meta={}, sessions={},
                             chunk_size=1 << 20, changed=ticket.changed)
            commit_succeeded(ticket, "now", 0)
        return ticket

    update({"h": {f"{i:04d}": {"v": i} for i in range(200)}, "s": 0})
    assert save().changed is None  # a new job: the store has no tree to diff against
    update({"h": {"0200": {"v": 1}}})
    assert save(fail=True).changed == (1, {"h": {"0200": None}})
    update({"h": {"0201": {"v": 2}, "0003": {"v": 3}}, "s": 1})
    last = save()
    # "h" has 200 keys: its subtrees are held packed (state.py), and a merge into one records it whole.
    assert last.changed == (1, {"h": {"0200": None, "0201": None, "0003": None}, "s": None})
    full = store(tmp_path / "full")
    full.write_version(last.root, version=last.version, step=None, reason="t", meta={}, sessions={},
                       chunk_size=1 << 20)
    assert js.read_manifest(last.version)["root"] == full.read_manifest(last.version)["root"]
