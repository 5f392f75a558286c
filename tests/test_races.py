"""Races between requests of one job, on a real daemon (issue 9, defects 2, 3 and 4).

The race windows are widened with the fault file's ``sleep`` action (a stall at a named point of the
real save or gc path), so each test hits its window every time instead of once in a while.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import autosaved
from autosaved.client.slots import create_memfd
from autosaved.protocol import pack_header, unpack_header
from autosaved.shm import fd_socket_path
from autosaved.storage.local import Store
from autosaved.testing.private import PrivateDaemon
from autosaved.tree import to_node

from .conftest import NO_AUTO_POLICY, fault_fired, wait_for


def raw(address: str, op: str, **fields: Any) -> dict[str, Any]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    try:
        sock.send_multipart([pack_header({"v": 1, "op": op, "seq": 1, **fields})])
        assert sock.poll(120_000), "no reply"
        return unpack_header(sock.recv_multipart()[0])
    finally:
        sock.close(0)


def in_thread(func: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = func()
        except BaseException as exc:  # reported by the test
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def job_dir(d: PrivateDaemon, job: str) -> Path:
    return d.state_dir / "jobs" / str(os.geteuid()) / job


def test_an_update_during_a_delete_is_never_acked_for_the_folder_being_deleted(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("r", address=d.address) as c:
        c.update({"old": np.arange(1000, dtype=np.float32)})
    # The save stalls before its manifest, holding the job's io lock: the delete then waits for it.
    faults.write_text("manifest.open.before 1 sleep5\n")
    saver, _ = in_thread(lambda: raw(d.address, "save", job="r"))
    wait_for(lambda: any((job_dir(d, "r") / "objects").glob("*/*")), timeout=30)  # chunks written: stalled
    deleter, deleted = in_thread(lambda: raw(d.address, "delete", job="r"))
    fault_fired(faults, "delete.lock.before")  # the delete holds the job's key lock and waits for the save
    # A new client recreates the job while the delete waits. Its ack must be for a folder that survives.
    with autosaved.Client("r", address=d.address) as c:
        ack = c.update({"new": 1}, wait="logged")
        assert ack.level == "logged"
    deleter.join(60)
    saver.join(60)
    assert deleted["value"]["ok"], deleted
    d.kill()
    d.start()
    assert autosaved.restore("r", state_dir=d.state_dir) == {"new": 1}
    c2 = autosaved.Client("r", address=d.address)
    try:
        assert c2.restore() == {"new": 1}
    finally:
        c2.close()


def test_gc_of_a_job_not_loaded_never_removes_chunks_of_a_save_in_progress(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("g", address=d.address) as c:
        c.update({"a": np.arange(10_000, dtype=np.float64)}, wait="committed")
    d.stop()
    d.start()  # the job is on disk, not loaded
    # gc stalls 4 s before it lists what manifests reference; the save stalls 7 s before its manifest.
    faults.write_text("gc.collect.before 1 sleep4\nmanifest.open.before 1 sleep7\n")
    collector, collected = in_thread(lambda: raw(d.address, "gc", job="g"))
    fault_fired(faults, "gc.collect.before")  # gc took its list of jobs (g not loaded) and stalls there
    fresh = np.random.default_rng(1).standard_normal(200_000)
    with autosaved.Client("g", address=d.address) as c:
        version = c.update({"b": fresh}, wait="committed").version
    collector.join(60)
    assert collected["value"]["ok"], collected
    store = Store(d.state_dir).job(os.geteuid(), "g")
    assert store.verify(version).ok, store.verify(version).error  # every chunk it names is there
    with autosaved.Client("g", address=d.address) as c:
        got = c.restore(version)
    assert np.array_equal(got["b"], fresh)


@pytest.mark.parametrize("dtype", ["|u1", "<f4"])
def test_a_client_scribbling_on_its_slot_cannot_make_a_chunk_mismatch_its_name(
        make_daemon: Callable[..., PrivateDaemon], dtype: str) -> None:
    """``|u1`` is tried for compression (a private copy is hashed, compressed and written); ``<f4`` is not,
    and goes from the slot into its chunk file, named by the hash of that file (storage/slotwrite.py)."""
    d = make_daemon('chunk_size = "64KiB"\n' + NO_AUTO_POLICY)
    path = fd_socket_path(d.address)
    assert path is not None
    size = 32 * 1024 * 1024
    fdsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fdsock.settimeout(30)
    fdsock.connect(path)
    token = msgpack.unpackb(fdsock.recv(4096))["token"]
    fd, mapping = create_memfd(size)
    socket.send_fds(fdsock, [msgpack.packb({"op": "add", "slot": 1, "size": size})], [fd])
    assert msgpack.unpackb(fdsock.recv(4096))["ok"]
    arr = np.frombuffer(mapping, dtype=np.uint8)
    arr[:] = 7
    itemsize = int(dtype[-1])
    desc = {"kind": "ndarray", "dtype": dtype, "shape": [size // itemsize], "nbytes": size}
    reply = raw(d.address, "update", job="s", session="s", tree={"m": [["w", {"b": 0}]]}, blobs=[desc],
                shm={"conn": token, "slot": 1, "refs": [[0, 0]]})
    assert reply["ok"], reply
    # The client ignores "held" and keeps writing into the slot while the daemon saves it.
    stop = threading.Event()

    def scribble(target: np.ndarray) -> None:
        n = 0
        while not stop.is_set():
            n = (n + 1) % 251
            target[:] = n

    scribbler = threading.Thread(target=scribble, args=(arr,), daemon=True)
    scribbler.start()
    try:
        for _ in range(3):
            assert raw(d.address, "update", job="s", session="s", seq=2, tree={"m": [["t", 1]]}, blobs=[])["ok"]
            saved = raw(d.address, "save", job="s")
            assert saved["ok"], saved
    finally:
        stop.set()
        scribbler.join(10)
    report = Store(d.state_dir).job(os.geteuid(), "s").check()
    assert report["ok"], report  # every stored chunk hashes to its name
    fdsock.close()
    os.close(fd)
    del arr
    mapping.close()


def test_a_snapshot_holds_its_slots_from_the_instant_it_is_taken(tmp_path: Path) -> None:
    """Writer.begin takes the snapshot synchronously; its blobs must count as referenced (``held``) from
    that instant, not from when the save task first runs: an update answered in between would otherwise
    tell the client the slot is free while the save still has to read it."""
    import mmap

    import anyio

    from autosaved.config import PolicySettings
    from autosaved.daemon.accounting import Ledger
    from autosaved.daemon.jobs import Job
    from autosaved.daemon.writer import Writer
    from autosaved.policy import SaveReason
    from autosaved.state import counted
    from autosaved.tree import Blob

    slot = mmap.mmap(-1, 4096)
    blob = Blob(kind="ndarray", dtype="|u1", shape=(4096,), nbytes=4096, data=memoryview(slot))
    ledger = Ledger()
    job = Job(owner=os.geteuid(), name="hold", store=Store(tmp_path).job(os.geteuid(), "hold"),
              settings=PolicySettings(), root=counted({"w": blob}), generation=1, ledger=ledger)
    ledger.attach(job.owner, job.root)
    seen: list[bool] = []

    async def main() -> None:
        writer = Writer(chunk_size=lambda: 1 << 20, clock=time.monotonic, on_done=lambda: None)
        async with anyio.create_task_group() as tg:
            writer.begin(job, SaveReason.EXPLICIT, tg)
            # The next update replaces the leaf, in the same event-loop step: the snapshot still reads it.
            job.apply({"w": 1}, session="s", seq=1, step=None, meta=None, size=1, now=0.0)
            seen.append(id(slot) in ledger.refs)
        seen.append(id(slot) in ledger.refs)  # the save is done: nothing reads the slot any more

    anyio.run(main)
    assert seen == [True, False]
    assert job.latest_version == 1


def test_updates_pipelined_to_a_job_being_loaded_apply_in_the_order_sent(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    """Updates of one job sent back to back (no ack awaited) while the daemon loads the job from disk apply
    in the order sent: those that came during the load and those that come as it finishes. Before, the
    load's waiters were woken one per event-loop turn while an update received meanwhile took the fast path
    of a loaded job and was applied ahead of them (a later value overwritten by an earlier one)."""
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("o", address=d.address) as c:
        c.update({"x": -1}, wait="committed")
    d.stop()
    faults.write_text("load.job.before 1 sleep1\n")  # the load holds its lock a while: updates queue behind it
    d.start()  # the job is on disk, not loaded
    during, after = 120, 120  # below quota.max_requests (256) in flight
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(d.address)

    def send(k: int) -> None:
        node, _ = to_node({"x": k, f"k{k}": k})
        sock.send_multipart([pack_header({"v": 1, "op": "update", "job": "o", "seq": k, "session": "pipe",
                                          "tree": node})])

    replies: list[dict[str, Any]] = []
    try:
        send(1)
        fault_fired(faults, "load.job.before")  # the first update is loading the job
        for k in range(2, during + 1):
            send(k)
        assert sock.poll(120_000), "no reply"
        replies.append(unpack_header(sock.recv_multipart()[0]))  # the load is done: keep sending as it ends
        for k in range(during + 1, during + after + 1):
            send(k)
        while len(replies) < during + after:
            assert sock.poll(120_000), "no reply"
            replies.append(unpack_header(sock.recv_multipart()[0]))
    finally:
        sock.close(0)
    assert all(r.get("ack") == "accepted" for r in replies), [r for r in replies if r.get("ack") != "accepted"]
    # Each accepted update is answered with the job's generation after it: in seq order, one apiece.
    generations = [r["generation"] for r in sorted(replies, key=lambda r: r["seq"])]
    assert generations == sorted(generations) and len(set(generations)) == len(generations), generations
    with autosaved.Client("o", address=d.address) as c:
        got = c.restore()
    assert got["x"] == during + after
    assert all(got[f"k{k}"] == k for k in range(1, during + after + 1))


def test_a_recovery_save_held_before_its_manifest_is_never_overtaken_by_the_next_save_or_its_collection(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    """Issue 19's power-loss flake, suspects ruled out: the restart's recovery save is held before its
    manifest while the next save is asked for; the next save drops the leaf the recovery save wrote, and
    ``keep_last = 1`` makes each save's retention collect. A save's write and another save's write or
    retention of the job must never overlap: the recovery save's collection (after its commit, when the job
    no longer counts as saving) would sweep pages the next save has written but not yet named, and the next
    save's collection would sweep the recovery save's chunks. The saves run one after the other, in version
    order, and the one version left verifies."""
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY + "keep_last = 1\n", env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    rng = np.random.default_rng(4)
    with autosaved.Client("rv", address=d.address) as c:
        c.update({"n": 1, "a": rng.standard_normal(40_000)}, wait="committed")
        c.update({"n": 2, "b": rng.standard_normal(40_000)}, wait="logged")  # only in the log
    d.kill()
    faults.write_text("manifest.open.before 1 sleep4\n")  # the recovery save, once its chunks are in
    d.start()
    with autosaved.Client("rv", address=d.address) as c:  # its hello loads the job: the recovery save starts
        fault_fired(faults, "manifest.open.before")
        version = c.update({"n": 3, "b": autosaved.DELETE}, wait="committed").version
    # The ack comes at the commit; the save's retention (which drops version 2) follows it.
    wait_for(lambda: "retention job=rv deleted_versions=[2]" in d.log(), timeout=60)
    saved = [(int(m.group(1)), m.group(2)) for m in re.finditer(r"saved job=rv .*?version=(\d+) .*?reason=(\w+)",
                                                                 d.log())]
    assert saved == [(1, "explicit"), (2, "recovery"), (version, "explicit")] and version == 3, saved
    store = Store(d.state_dir).job(os.geteuid(), "rv")
    assert [(v.id, v.ok, v.error) for v in store.list_versions(verify=True)] == [(3, True, None)]
    d.kill()
    got = autosaved.restore("rv", state_dir=d.state_dir)
    assert got["n"] == 3 and "b" not in got
