"""Incremental accounting of held state (issue 19, defects 2 and 4), in process: the cost model, the
counted merge, and the ledger's counters against a full recount after random merge/delete sequences.

Then the real daemon: a request's work does not grow with another job's size (measured by the count of
tree entries the daemon's walks visited, which it reports, never by a clock), and the quota refuses the
shapes that used to slip through, writing nothing.
"""

from __future__ import annotations

import mmap
import os
import signal
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autosaved
from autosaved.daemon.accounting import Ledger
from autosaved.daemon.jobs import Job
from autosaved.protocol import pack_header, unpack_header
from autosaved.state import (
    BLOB_OVERHEAD,
    FLAT_MAX,
    Node,
    counted,
    empty_node,
    measure,
    merge,
    merge_counted,
    merge_deltas,
)
from autosaved.testing.private import PrivateDaemon
from autosaved.tree import DELETE, Blob, Walked, iter_blobs, to_node

from .conftest import NO_AUTO_POLICY, wait_for

SLOTS = [mmap.mmap(-1, 4096) for _ in range(3)]


def slot_blob(slot: int, n: int = 16) -> Blob:
    return Blob(kind="bytes", dtype="bytes", shape=(n,), nbytes=n, data=memoryview(SLOTS[slot])[:n])


def heap_blob(n: int = 8) -> Blob:
    return Blob(kind="bytes", dtype="bytes", shape=(n,), nbytes=n, data=memoryview(bytes(n)))


def stored_blob(n: int = 8) -> Blob:
    return Blob(kind="bytes", dtype="bytes", shape=(n,), nbytes=n, data=None)


def encoded_cost(tree: Any) -> int:
    """The oracle: what the tree's node form really encodes to (msgpack), each binary leaf counted as its
    bytes plus BLOB_OVERHEAD instead of its one-byte stand-in."""
    blobs = iter_blobs(tree)

    def strip(v: Any) -> Any:
        if isinstance(v, Blob):
            return None
        if isinstance(v, dict):
            return {k: strip(s) for k, s in v.items()}
        if isinstance(v, list):
            return [strip(s) for s in v]
        if isinstance(v, tuple):
            return tuple(strip(s) for s in v)
        return v

    node, _ = to_node(strip(tree))
    return len(msgpack.packb(node)) + sum(b.nbytes + BLOB_OVERHEAD - 1 for b in blobs)


def recount(tree: Any) -> tuple[int, int, dict[int, int]]:
    """(cost, held, refs) by a full walk, sharing no code with the counters."""
    blobs = iter_blobs(tree)
    held = sum(b.nbytes for b in blobs if b.data is not None)
    refs = Counter(id(b.data.obj) for b in blobs if b.data is not None and isinstance(b.data.obj, mmap.mmap))
    return encoded_cost(tree), held, dict(refs)


def plain(tree: Any) -> Any:
    return {k: plain(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


# -- the cost model: what a value costs, table-driven --------------------------------------------------

COSTS = [
    ("empty map", {}, 4),
    ("empty list", [], 4),
    ("empty tuple", (), 4),
    ("None", None, 1),
    ("small int", 7, 1),
    ("negative fixint", -32, 1),
    ("uint8", 200, 2),
    ("int16", -1000, 3),
    ("int32", 1 << 20, 5),
    ("int64", 1 << 40, 9),
    ("float", 0.5, 9),
    ("short str", "abc", 4),
    ("str8", "x" * 40, 42),
    ("non-ascii str", "é" * 10, 21),
    ("one key", {"a": 1}, 4 + 1 + 2 + 1),
    ("int key", {7: None}, 4 + 1 + 1 + 1),
    ("nested empty", {"k": {}}, 4 + 1 + 2 + 4),
    ("list of maps", [{}, {}], 4 + 4 + 4),
]


@pytest.mark.parametrize(("value", "cost"), [(v, c) for _, v, c in COSTS], ids=[n for n, _, _ in COSTS])
def test_cost_is_the_encoded_size(value: Any, cost: int) -> None:
    assert measure(counted(value))[0] == cost == encoded_cost(value)


def test_what_used_to_count_nothing_counts() -> None:
    # Defect 4: empty containers counted 0 bytes, a 4,000-digit int 8, keys nothing in a list of maps.
    assert measure(counted({f"k{i}": [] for i in range(1000)}))[0] >= 1000 * 8
    assert measure(counted({f"k{i}": {} for i in range(1000)}))[0] >= 1000 * 8
    big = int("9" * 4000)
    assert encoded_cost(big) <= measure(big)[0] <= encoded_cost(big) + 2
    assert measure(-big)[0] >= 4000
    assert measure(heap_blob(100))[:2] == (100 + BLOB_OVERHEAD, 100)
    assert measure(stored_blob(100))[:2] == (100 + BLOB_OVERHEAD, 0)  # stored only: not in daemon memory
    assert measure(slot_blob(1))[2] == {id(SLOTS[1]): 1}


# -- the counted merge: table-driven ---------------------------------------------------------------------

MERGES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("add a key", {"a": 1}, {"b": 2}),
    ("replace a scalar", {"a": 1}, {"a": "x" * 300}),
    ("delete a key", {"a": 1, "b": 2}, {"a": DELETE}),
    ("delete a missing key", {"a": 1}, {"z": DELETE}),
    ("merge into a map", {"m": {"x": 1, "y": [1, 2]}}, {"m": {"y": DELETE, "z": {}}}),
    ("replace a map by a scalar", {"m": {"x": {"y": 1}}}, {"m": 0}),
    ("replace a scalar by a map", {"m": 0}, {"m": {"x": {"y": 1}}}),
    ("replace a list", {"l": [1, {"a": 2}]}, {"l": ()}),
    ("a map grows past 15 keys", {f"k{i}": i for i in range(15)}, {"k15": 15}),
]


@pytest.mark.parametrize(("base", "delta"), [(b, d) for _, b, d in MERGES], ids=[n for n, _, _ in MERGES])
def test_merge_counts_exactly_what_it_changes(base: dict[str, Any], delta: dict[str, Any]) -> None:
    root = counted(base)
    merged = merge_counted(root, delta)
    assert plain(merged.root) == merge(base, delta)  # same contents as the plain merge
    assert merged.root.cost == encoded_cost(merged.root)
    assert merged.cost == encoded_cost(merged.root) - encoded_cost(base)
    assert plain(root) == base and root.cost == encoded_cost(base)  # the old root is untouched


def test_merge_counts_slot_references_on_the_paths_it_touched() -> None:
    root = counted({"a": {"w": slot_blob(0), "v": slot_blob(0)}, "b": heap_blob(8)})
    assert root.refs == {id(SLOTS[0]): 2} and root.held == 32 + 8
    m = merge_counted(root, {"a": {"w": slot_blob(1)}, "b": DELETE})
    assert m.added_refs == {id(SLOTS[1]): 1} and m.removed_refs == {id(SLOTS[0]): 1}
    assert m.root.refs == {id(SLOTS[0]): 1, id(SLOTS[1]): 1} and m.held == -8
    m2 = merge_counted(m.root, {"a": 5})
    assert m2.removed_refs == {id(SLOTS[0]): 1, id(SLOTS[1]): 1} and m2.root.refs is None


def test_a_merge_never_visits_what_it_does_not_touch() -> None:
    root = counted({f"k{i}": {"a": i, "l": [i] * 10} for i in range(2000)})
    before = Walked.entries
    merge_counted(root, {"k5": {"a": "new"}, "x": {"y": []}})
    # The delta's entries (2 + 1 + 1 + 1), the replaced leaf measured, and the one packed subtree the delta
    # merges into, opened and counted (2 + 10: state.py, packed subtrees): nothing of the other 1,999 maps.
    assert Walked.entries - before <= 20


def test_an_update_copies_a_big_mapping_once_per_snapshot_not_once_per_update() -> None:
    """Issue 20: path copying copied the whole mapping on an update's path, so each put into a history of
    100,000 checkpoints copied 100,000 entries (and the garbage collector walked the copy). A merge of the
    job's generation changes what that generation built in place; a snapshot starts a new generation and
    its tree never changes."""
    job = Job(owner=0, name="j", store=None, settings=None)  # type: ignore[arg-type]
    job.root = counted({"cp": {f"{i:08d}": {"a": i, "l": [i]} for i in range(5000)}, "n": 0})
    snapshot, frozen = job.root, to_node(job.root)[0]
    job.merge_gen += 1

    def put(k: int) -> int:
        before = Walked.copied
        job.apply({"cp": {f"x{k:07d}": {"a": k, "l": [k]}}, "n": k}, session="s", seq=k, step=None, meta=None,
                  size=1, now=0.0)
        return Walked.copied - before

    assert put(1) >= 5000  # the first update after the snapshot copies the mappings on its path, once
    # What the next ones copy: at most the update's own one-key map, once (the pending log delta's copy).
    assert sum(put(k) for k in range(2, 50)) <= 2
    assert to_node(snapshot)[0] == frozen and len(snapshot["cp"]) == 5000
    assert len(job.root["cp"]) == 5049 and job.root.cost == encoded_cost(job.root)
    job.merge_gen += 1  # the next snapshot
    assert put(50) >= 5049 and put(51) == 0


def test_the_pending_log_delta_grows_in_place_and_never_changes_a_callers_delta() -> None:
    """Issue 20: at ``accepted`` the job's pending log delta collects every update since the last log
    record or save; copying it at each update made 90,000 puts without a save quadratic."""
    job = Job(owner=0, name="j", store=None, settings=None)  # type: ignore[arg-type]
    deltas = [{"cp": {f"{k:08d}": {"m": k}}, "n": k} for k in range(3000)]
    before = Walked.copied
    for k, delta in enumerate(deltas):
        job.apply(delta, session="s", seq=k + 1, step=None, meta=None, size=1, now=0.0)
    assert Walked.copied - before < 3 * 3000  # not 3000 * 3000 / 2
    assert deltas[5] == {"cp": {"00000005": {"m": 5}}, "n": 5}  # the callers' deltas are as they sent them
    assert len(job.unlogged["cp"]) == 3000 and job.unlogged["n"] == 2999
    assert merge({}, job.unlogged) == merge({}, {"cp": {f"{k:08d}": {"m": k} for k in range(3000)}, "n": 2999})


def test_small_flat_maps_stay_plain_dicts_and_others_are_nodes() -> None:
    """The garbage collector never tracks a plain dict of scalars, but tracks every Node: 600,000 tiny maps
    as Nodes made every collection walk them (a ping beside them took 3x as long)."""
    import gc

    root = merge_counted(empty_node(), {"m": {f"k{i}": i for i in range(FLAT_MAX)}, "n": {"a": {"b": 1}}}).root
    assert type(root) is Node and type(root["m"]) is dict and not gc.is_tracked(root["m"])
    assert type(root["n"]) is Node and type(root["n"]["a"]) is dict
    grown = merge_counted(root, {"m": {"one more": 1}}).root
    assert type(grown["m"]) is Node and grown.cost == encoded_cost(grown)
    shrunk = merge_counted(grown, {"m": {"k0": DELETE}}).root
    assert type(shrunk["m"]) is dict and shrunk.cost == encoded_cost(shrunk)
    with_blob = merge_counted(shrunk, {"m": {"w": slot_blob(0)}}).root
    assert type(with_blob["m"]) is Node and with_blob.refs == {id(SLOTS[0]): 1}
    assert type(counted({"a": {"b": 1}})["a"]) is dict and type(counted({})) is Node  # the root: always a Node


# -- the property: counters equal a full recount after any sequence ---------------------------------------

# 20 keys: a map that deltas fill crosses FLAT_MAX (a plain dict becomes a Node and back).
KEYS = st.sampled_from(["a", "b", "c", 1, 2, *(f"k{i}" for i in range(15))])
LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40), st.builds(slot_blob, st.integers(0, 2)), st.builds(heap_blob), st.builds(stored_blob),
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=4), st.just(()),
)
VALUES = st.recursive(LEAVES, lambda inner: st.dictionaries(KEYS, inner, max_size=4), max_leaves=12)
DELTAS = st.recursive(
    st.one_of(LEAVES, st.just(DELETE)),
    lambda inner: st.dictionaries(KEYS, st.one_of(inner, st.just(DELETE)), max_size=4),
    max_leaves=12,
).filter(lambda d: isinstance(d, dict))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(DELTAS, min_size=1, max_size=12), st.lists(st.integers(0, 11), max_size=3))
def test_counters_equal_a_full_recount_after_any_merges_and_deletes(deltas: list[dict[Any, Any]],
                                                                    snaps: list[int]) -> None:
    ledger = Ledger()
    job = Job(owner=1000, name="j", store=None, settings=None)  # type: ignore[arg-type]
    job.ledger = ledger
    ledger.attach(job.owner, job.root)
    held_snapshots = []
    frozen: list[tuple[Any, Any, list[int]]] = []
    for i, delta in enumerate(deltas):
        job.apply(delta, session="s", seq=i + 1, step=None, meta=None, size=1, now=0.0)
        cost, held, refs = recount(job.root)
        assert (job.root.cost, job.root.held, job.root.refs or {}) == (cost, held, refs)
        # Leaves the not-yet-logged delta reads are always in the state too: it needs no count of its own.
        live = {id(b) for b in iter_blobs(job.root)}
        assert all(id(b) in live for b in iter_blobs(job.unlogged))
        if i in snaps:  # a snapshot being saved holds its root's slots until released
            job.merge_gen += 1  # as take_snapshot does: later updates must not change what it holds
            held_snapshots.append((job.root, ledger.hold(job.root.refs)))
            frozen.append((job.root, to_node(job.root)[0], [id(b) for b in iter_blobs(job.root)]))
        expected = Counter(refs)
        for snap, _ in held_snapshots:
            expected.update(recount(snap)[2])
        assert ledger.refs == dict(expected)
        assert ledger.used(1000) == cost and ledger.held_bytes == ledger.held_of(1000) == held
    for snap, node, blob_ids in frozen:  # updates merged in place never touched a snapshot's tree
        assert to_node(snap)[0] == node and [id(b) for b in iter_blobs(snap)] == blob_ids
    for _, hold in held_snapshots:
        hold.release()
        hold.release()  # idempotent
    ledger.detach(job.owner, job.root)
    assert ledger.refs == {} and ledger.state_bytes == {} and ledger.held_by_owner == {} and ledger.held_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(DELTAS, min_size=1, max_size=8))
def test_a_log_record_holds_at_least_the_slots_it_reads(deltas: list[dict[Any, Any]]) -> None:
    ledger = Ledger()
    job = Job(owner=1, name="j", store=None, settings=None)  # type: ignore[arg-type]
    job.ledger = ledger
    ledger.attach(job.owner, job.root)
    for i, delta in enumerate(deltas):
        job.apply(delta, session="s", seq=i + 1, step=None, meta=None, size=1, now=0.0)
    record = job.take_log_record()
    hold = job.take_log_hold()
    ledger.detach(job.owner, job.root)  # only the record's hold is left
    reads = Counter(id(b.data.obj) for b in iter_blobs(record.delta)
                    if b.data is not None and isinstance(b.data.obj, mmap.mmap))
    assert all(ledger.refs.get(m, 0) >= n for m, n in reads.items())
    hold.release()
    assert ledger.refs == {}


def test_unlogged_deltas_merge_like_the_state() -> None:
    root, unlogged = empty_node(), {}
    for d in ({"a": {"x": slot_blob(0)}}, {"a": DELETE}, {"a": {"y": 1}}):
        root = merge_counted(root, d).root
        unlogged = merge_deltas(unlogged, d)
    assert plain(merge(empty_node(), unlogged)) == plain(root) == {"a": {"y": 1}}
    assert isinstance(root, Node) and root.refs is None


# -- the real daemon ---------------------------------------------------------------------------------------


def raw(address: str, op: str, **fields: Any) -> dict[str, Any]:
    """One request as any local program could send it (root may name another ``owner``)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    try:
        sock.send_multipart([pack_header({"v": 1, "op": op, "seq": 1, **fields})])
        assert sock.poll(60_000), "no reply"
        return unpack_header(sock.recv_multipart()[0])
    finally:
        sock.close(0)


def test_an_update_costs_the_same_beside_a_job_of_many_tiny_maps(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """Defect 2: a client with a lent slot made every update walk every leaf of every job (the held-slot
    reply), and the quota, ``status`` and ``/metrics`` walked too: another job's 600,000 tiny maps made a
    1 MiB update take 4.3 s. Now the work of an update, counted in tree entries the daemon visited, is the
    same beside 60,000 tiny maps as beside nothing."""
    d = make_daemon(NO_AUTO_POLICY + '[quota]\nmax_bytes = "1GiB"\n')
    walked = lambda: int(raw(d.address, "status")["daemon"]["tree_entries_walked"])  # noqa: E731
    w = np.arange(1 << 20, dtype=np.uint8)
    with autosaved.Client("a", address=d.address) as a:
        a.update({"w": w, "n": 0})
        assert a._slots.lent, "the 1 MiB leaf did not go through a slot: the test would not see the walk"

        def work() -> tuple[int, int]:
            before = walked()
            a.update({"w": w, "n": 1})  # 1 MiB through a slot
            middle = walked()
            a.update({"n": 2})  # one key (inline, but it asks which slots are still held)
            return middle - before, walked() - middle

        alone = work()
        with autosaved.Client("b", address=d.address) as b:
            for u in range(3):
                b.update({f"k{u}_{j}": {"a": j} for j in range(20_000)})
        beside = work()
        big = raw(d.address, "status")
    assert beside == alone, (alone, beside)
    assert max(alone) < 100  # the update's own few entries, not a walk of job b's 60,000 maps
    # status reads counters: b's state is counted (every map, key and int), the slot of a is referenced
    b_job = next(j for j in big["jobs"] if j["job"] == "b")
    assert b_job["state_bytes"] >= 60_000 * 10 and big["daemon"]["state_bytes"] >= b_job["state_bytes"]
    assert big["daemon"]["referenced_slot_mappings"] >= 1 and big["daemon"]["held_bytes"] >= 1 << 20


def test_updates_into_a_long_history_copy_nothing_between_saves(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """Issue 20, through the daemon: after a save, the first update into a 20,000-entry mapping copies it
    once; the next ones copy nothing (status counts the entries merges copied), and the saved version and
    the live state both come back exact."""
    d = make_daemon(NO_AUTO_POLICY)
    copied = lambda: int(raw(d.address, "status")["daemon"]["tree_entries_copied"])  # noqa: E731
    with autosaved.Client("h", address=d.address) as c:
        c.update({"cp": {f"{i:08d}": {"m": f"message {i}"} for i in range(20_000)}})
        version = c.save()
        c.update({"cp": {"x0": {"m": "after the save"}}}, wait="logged")
        before = copied()
        for k in range(1, 20):
            c.update({"cp": {f"x{k}": {"m": k}}, "n": k}, wait="logged")
        assert copied() - before < 100, copied() - before
        live = c.restore()
        assert len(live["cp"]) == 20_020 and live["cp"]["x19"] == {"m": 19} and live["n"] == 19
        saved = c.restore(version)
        assert len(saved["cp"]) == 20_000 and "n" not in saved


SHAPES = {
    # Each of these counted (nearly) nothing before the fix: empty containers 0 bytes, a big int 8.
    "empty lists": {"m": [["x", {"l": [{"l": []}] * 400_000}]]},
    "empty maps": {"m": [["x", {"l": [{"m": []}] * 400_000}]]},
    "4000-digit ints": {"m": [["x", {"l": [{"I": "9" * 4000}] * 400}]]},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_quota_counts_empty_containers_and_big_ints(make_daemon: Callable[..., PrivateDaemon], shape: str) -> None:
    """Defect 4: under a 1 MiB quota one user took the daemon from 55 to 1,364 MiB with shapes that counted
    nothing. Each is refused with a clear ``quota`` error, and nothing is applied or logged."""
    d = make_daemon(NO_AUTO_POLICY + '[quota]\nmax_bytes = "1MiB"\n')
    # Root is exempt from quotas but acts on another uid's jobs with ``owner``: that uid's quota applies.
    who = {"owner": 4242} if os.geteuid() == 0 else {}
    first = raw(d.address, "update", job="q", session="s", tree={"m": [["keep", 1]]}, blobs=[], wait="logged",
                **who)
    assert first["ok"], first
    before = raw(d.address, "status", job="q", **who)
    reply = raw(d.address, "update", job="q", session="s", tree=SHAPES[shape], blobs=[], wait="logged", **who)
    assert reply["ok"] is False and reply["code"] == "quota", reply
    assert "quota.max_bytes" in reply["message"] and reply["details"]["update"] > 1 << 20, reply
    after = raw(d.address, "status", job="q", **who)
    assert after["wal_lsn"] == before["wal_lsn"] and after["state_bytes"] == before["state_bytes"]
    restored = raw(d.address, "restore", job="q", **who)
    assert restored["tree"] == {"m": [["keep", 1]]}
    # The same shape, small, fits: the quota is about the size, not the shape.
    small = {"m": [["x", {"l": [{"l": []}] * 1000}]]}
    assert raw(d.address, "update", job="q", session="s", tree=small, blobs=[], **who)["ok"]


def test_a_user_over_a_lowered_quota_can_still_make_room(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """An update that adds nothing always goes on: after a reload lowers ``quota.max_bytes`` below what a
    user holds, growing is refused but deleting is not (before, every update was refused, deletes too)."""
    d = make_daemon(NO_AUTO_POLICY + '[quota]\nmax_bytes = "1MiB"\n')
    who = {"owner": 4242} if os.geteuid() == 0 else {}

    def update(tree: dict[str, Any]) -> dict[str, Any]:
        return raw(d.address, "update", job="q", session="s", tree=tree, blobs=[], **who)

    assert update({"m": [["big", "x" * 600_000], ["n", 1]]})["ok"]
    d.config_path.write_text(d.config_path.read_text().replace('"1MiB"', '"256KiB"'))
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: "trigger=SIGHUP" in d.log(), timeout=60)
    grow = update({"m": [["more", 1]]})
    assert grow["ok"] is False and grow["code"] == "quota", grow
    assert update({"m": [["n", 2]]})["ok"]  # the same size: nothing added
    assert update({"m": [["big", {"x": 0}]]})["ok"]  # a delete frees room
    assert update({"m": [["more", 1]]})["ok"]
    assert raw(d.address, "restore", job="q", **who)["tree"] == {"m": [["n", 2], ["more", 1]]}


def test_counters_follow_replay_and_delete(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """A job's cost is counted once when it is loaded (a version plus replayed log records), and leaves the
    owner's usage when the job is deleted: the daemon's totals are the sum of what it holds, nothing stale."""
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("r", address=d.address) as c:
        # 4000 bytes: above format 2's INLINE_MAX, so a chunk, not a value kept inside a page (those load with it)
        c.update({"maps": {f"k{i}": {"a": i} for i in range(500)}, "w": np.zeros(4000, dtype=np.uint8)})
        c.save()
        c.update({"maps": {"k1": autosaved.DELETE, "new": []}, "s": "é" * 50}, wait="logged")
        live = raw(d.address, "status", job="r")
    d.kill()
    d.start()
    replayed = raw(d.address, "status", job="r")  # loads the job: the version, then the log record
    assert replayed["state_bytes"] == live["state_bytes"] > 500 * 8
    daemon = raw(d.address, "status")["daemon"]
    assert daemon["state_bytes"] == replayed["state_bytes"]
    assert daemon["held_bytes"] == 0  # loaded lazily: the array's bytes stay on disk until read
    assert raw(d.address, "delete", job="r")["ok"]
    daemon = raw(d.address, "status")["daemon"]
    assert daemon["state_bytes"] == 0 and daemon["held_bytes"] == 0


def test_a_bytes_leaf_is_held_compactly_and_a_slot_view_stays_a_view() -> None:
    """Issue 20: an agent checkpoint holds four small bytes leaves, and each Blob cost ~570 bytes beside its
    bytes (a dataclass's ``__dict__``, a memoryview and its managed buffer, an empty ``digests`` dict)."""
    import tracemalloc

    from autosaved.tree import inline_blob

    raw = bytes(range(200))
    blob = Blob(kind="bytes", dtype="bytes", shape=(200,), nbytes=200, data=memoryview(raw))
    assert blob.buffer is raw and blob.data is not None and blob.data.obj is raw and bytes(blob.data) == raw
    assert measure(blob) == (200 + BLOB_OVERHEAD, 200, None)
    part = Blob(kind="bytes", dtype="bytes", shape=(10,), nbytes=10, data=memoryview(raw)[10:20])
    assert type(part.buffer) is memoryview and bytes(part.data or b"") == raw[10:20]  # never copied
    backwards = Blob(kind="bytes", dtype="bytes", shape=(200,), nbytes=200, data=memoryview(raw)[::-1])
    assert bytes(backwards.data or b"") == raw[::-1]
    slot = slot_blob(1)
    assert type(slot.buffer) is memoryview and measure(slot)[2] == {id(SLOTS[1]): 1}
    blob.digests[4096] = ()
    assert blob.digests == {4096: ()} and not hasattr(blob, "__dict__")

    datas = [os.urandom(8) for _ in range(2000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        blobs = [inline_blob(d) for d in datas]
        per_leaf = (tracemalloc.get_traced_memory()[0] - before) / len(blobs)
    finally:
        tracemalloc.stop()
    assert per_leaf < 130, per_leaf  # ~570 before (its bytes, allocated by the decoder, not counted here)
    assert blobs[0].shape == (8,) and blob.shape == (200,) and blob.descriptor()["shape"] == [200]


def test_decoded_short_strings_are_shared() -> None:
    """Issue 20: a LangGraph checkpoint's four ``["msgpack", <bytes>]`` values decoded four str objects."""
    from autosaved.tree import SHARED_STR_MAX, from_node

    def fresh(s: str) -> str:
        return "".join([s[:1], s[1:]])  # a str object of its own, as a decoder makes

    short, long = "msgpack", "x" * (SHARED_STR_MAX + 1)
    node = {"m": [[fresh("k"), {"l": [fresh(short), fresh(short), fresh(long), fresh(long)]}],
                  [fresh("stage"), fresh(short)]]}
    tree = from_node(node, [])
    (a, b, c, d), e = tree["k"], tree["stage"]
    assert a == b == e == short and a is b is e
    assert c == d == long and c is not d  # a long (likely unique) string is not worth a table entry
    other = from_node({"m": [[fresh("stage"), 1]]}, [])
    assert next(iter(other)) is list(tree)[1]  # keys too


def test_a_decoded_list_has_no_spare_capacity() -> None:
    import sys

    from autosaved.tree import from_node

    for n in (1, 2, 5, 17):
        assert sys.getsizeof(from_node({"l": list(range(n))}, [])) == sys.getsizeof([0] * n)


def _agent_put(i: int) -> tuple[dict[str, Any], int]:
    """Step ``i`` of one agent thread in AutosavedSaver's layout (without LangGraph: the shape of
    ``autosaved bench history``), and its payload: the bytes of its four binary leaves."""
    cid, ver = f"1ef{i:033x}", f"{i + 1:032}.0"
    parent = f"1ef{i - 1:033x}" if i else None
    leaves = [os.urandom(300), os.urandom(100), os.urandom(1800), os.urandom(12)]
    delta = {"threads": {"t": {
        "cp": {"": {cid: {"c": ["msgpack", leaves[0]], "m": ["msgpack", leaves[1]], "p": parent, "r": None}}},
        "v": {"": {"messages": {ver: ["msgpack", leaves[2]]}, "step": {ver: ["msgpack", leaves[3]]}}},
        "latest": {"": cid}}}}
    return delta, sum(map(len, leaves))


def test_an_agent_history_costs_the_daemon_about_twice_its_payload(tmp_path: Any, figure: Any) -> None:
    """Issue 20: the daemon's RSS growth over an agent's history, filled at ``accepted`` and saved (what
    ``bench history`` measures), stays under 3x the history's payload: ~5x before (a small bytes leaf's
    ~570 B of objects; a save's peak of every new item at once, kept by the allocators), ~2.2x, then
    ~1.4x with packed subtrees (state.py)."""
    n0, n1 = 500, 4500
    payload = 0
    with PrivateDaemon(tmp_path / "d", config='memory_limit = "8GiB"\n' + NO_AUTO_POLICY) as d, \
            autosaved.Client("agent", address=d.address, timeout=60, save_timeout=300) as c:
        for i in range(n0):
            c.update(_agent_put(i)[0], wait="accepted")
        c.save()
        base = c.status()
        assert base["bytes_written"] < 8 << 20  # no heap trim follows this one
        with autosaved.client.admin.Admin(address=d.address) as a:
            rss0 = a.status()["daemon"]["rss_bytes"]
            for i in range(n0, n1):
                delta, size = _agent_put(i)
                payload += size
                c.update(delta, wait="accepted")
            c.save()
            assert c.status()["bytes_written"] - base["bytes_written"] >= 8 << 20  # a save the heap trim follows
            wait_for(lambda: d.log().count("heap trimmed") >= 1)
            rss1 = a.status()["daemon"]["rss_bytes"]
    ratio = (rss1 - rss0) / payload
    figure(f"agent history: RSS growth {(rss1 - rss0) / (n1 - n0):.0f} B per checkpoint, {ratio:.2f}x the payload")
    assert ratio < 3.0, ratio
