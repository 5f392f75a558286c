"""The prolly tree and the state-as-items encoding of format 2, pure (no files): history independence,
local rewrites, ranges that read only their pages, and exact round trips of every state shape."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autosaved.errors import CorruptVersion
from autosaved.state import Touched, counted, merge_counted, touch
from autosaved.storage import prolly
from autosaved.storage import statepages as sp
from autosaved.tree import DELETE, Blob, Replace

P = prolly.Params()
SMALL = prolly.Params(min_bytes=256, max_bytes=1024, q_leaf=4, q_node=4)  # many pages from few items


class Pages:
    """An in-memory page store that counts reads and writes."""

    def __init__(self) -> None:
        self.pages: dict[str, bytes] = {}
        self.reads: list[str] = []
        self.writes: list[str] = []

    def put(self, digest: str, raw: bytes) -> None:
        assert prolly.page_digest(raw) == digest
        if digest not in self.pages:  # a store writes a page it lacks, and only that
            self.writes.append(digest)
        self.pages[digest] = raw

    def get(self, digest: str) -> bytes:
        self.reads.append(digest)
        return self.pages[digest]


def kv(n: int, size: int = 100, salt: str = "") -> dict[bytes, bytes]:
    return {f"key{i:07d}".encode(): f"{salt}{i}".encode().ljust(size, b".") for i in range(n)}


def tree_of(items: dict[bytes, bytes], params: prolly.Params, pages: Pages) -> tuple[str, list[prolly.Ref]]:
    root, leaves = prolly.build(sorted(items.items()), params, pages.put)
    return root, leaves


def updated(leaves: list[prolly.Ref], edits: dict[bytes, bytes | None], params: prolly.Params,
            pages: Pages) -> tuple[str, list[prolly.Ref]]:
    new = prolly.apply(leaves, edits, params, pages.get, pages.put, "test")
    root, _height = prolly.build_levels(new, params, pages.put)
    return root, new


@pytest.mark.parametrize(("n", "edits"), [
    (0, {b"a": b"1"}),  # into an empty tree
    (1, {b"key0000000": None}),  # the tree becomes empty
    (5000, {b"key0000000": None}),  # the first key: a page's first key changes
    (5000, {b"key0004999": None, b"zzz": b"tail"}),  # at the end
    (5000, {b"key0002500": b"changed"}),  # a value in the middle
    (5000, {f"key{i:07d}".encode(): None for i in range(1000, 3000)}),  # many pages emptied
    (5000, {f"key{i:07d}x".encode(): b"ins" for i in range(0, 5000, 7)}),  # inserts everywhere
    (5000, {b"key0000100": b"x" * 40000}),  # a value larger than a page
])
def test_edits_give_the_tree_a_fresh_build_gives(n: int, edits: dict[bytes, bytes | None]) -> None:
    pages = Pages()
    items = kv(n)
    _root, leaves = tree_of(items, P, pages)
    root, new_leaves = updated(leaves, edits, P, pages)
    after = {**items, **{k: v for k, v in edits.items() if v is not None}}
    for k, v in edits.items():
        if v is None:
            after.pop(k, None)
    fresh = Pages()
    want_root, want_leaves = tree_of(after, P, fresh)
    assert (root, new_leaves) == (want_root, want_leaves)
    assert list(prolly.iterate(root, pages.get, "t")) == sorted(after.items())


def test_a_change_rewrites_only_the_pages_on_its_path() -> None:
    pages = Pages()
    _root, leaves = tree_of(kv(100_000), P, pages)
    assert len(leaves) > 1000  # three levels
    pages.reads.clear()
    pages.writes.clear()
    root, _ = updated(leaves, {b"key0050000": b"new value"}, P, pages)
    # one leaf read and written; above it, one page per level (interior pages are rebuilt in memory)
    assert len(pages.reads) == 1
    height = prolly.decode_page(pages.pages[root], root, "t").level
    assert len(pages.writes) == 1 + height
    # a value change never moves a boundary: the same number of leaves, the same first keys
    assert [r.first for r in _] == [r.first for r in leaves]


def test_a_range_reads_only_the_pages_that_overlap_it() -> None:
    pages = Pages()
    root, _leaves = tree_of(kv(100_000), P, pages)
    pages.reads.clear()
    got = list(prolly.iterate(root, pages.get, "t", b"key0070000", b"key0070010"))
    assert [k for k, _ in got] == [f"key{i:07d}".encode() for i in range(70000, 70010)]
    height = prolly.decode_page(pages.pages[root], root, "t").level
    assert len(pages.reads) <= height + 2  # the path down, plus a neighbour leaf when the range straddles


def test_pages_stay_within_their_bounds() -> None:
    pages = Pages()
    _root, leaves = tree_of(kv(20_000, size=150), P, pages)
    sizes = [len(pages.pages[r.digest]) for r in leaves[:-1]]
    assert min(sizes) >= P.min_bytes and max(sizes) <= P.max_bytes + 200
    assert 4096 <= sum(sizes) / len(sizes) <= 16384


def test_a_damaged_page_is_reported_as_corrupt() -> None:
    with pytest.raises(CorruptVersion, match="malformed"):
        prolly.decode_page(b"\x93\x01\x00\xc0", "ab" * 32, "job version 1")


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.binary(min_size=1, max_size=12), st.binary(max_size=60), max_size=400),
       st.lists(st.tuples(st.binary(min_size=1, max_size=12), st.none() | st.binary(max_size=60)), max_size=80),
       st.integers(min_value=1, max_value=4))
def test_same_items_same_root_whatever_the_edit_history(start: dict[bytes, bytes],
                                                        ops: list[tuple[bytes, bytes | None]], batches: int) -> None:
    pages = Pages()
    _root, leaves = tree_of(start, SMALL, pages)
    state = dict(start)
    root = _root
    step = max(1, len(ops) // batches)
    for i in range(0, len(ops), step):
        edits = dict(ops[i : i + step])
        root, leaves = updated(leaves, edits, SMALL, pages)
        for k, v in edits.items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
    want_root, want_leaves = tree_of(state, SMALL, Pages())
    assert root == want_root and leaves == want_leaves


# -- the state as items ----------------------------------------------------------------------------

def blob(data: bytes) -> Blob:
    return Blob("bytes", "bytes", (len(data),), len(data), data=memoryview(data))


def roundtrip(tree: Any) -> Any:
    blobs: dict[bytes, Blob] = {}

    def value(b: Blob) -> bytes:
        assert b.data is not None
        return sp.pack(["B", b.descriptor(), bytes(b.data)])

    entries = list(sp.items(tree, value))
    assert [k for k, _ in entries] == sorted(k for k, _ in entries)
    del blobs

    def make(v: list[Any]) -> Blob:
        return blob(v[2])

    return sp.unflatten(iter(entries), make, "t")


STATES = [
    {},
    {"a": 1, 1: "int key", "1": "str key", "b": (1, [2, (3,)]), "e": {}, "l": [], "t": ()},
    {"z": 1, "a": 2, 10: 3, -5: 4},  # insertion order that is not key order
    {"a\x00": 1, "a": {"x": 2}, "a\x00b": 3, "": {"": ""}},  # NUL and empty keys next to their prefixes
    {"nan": math.inf, "big": 2**70, "neg": -(2**80), "f": -0.0, "n": None, "t": True, "blob": blob(b"\x00\x01")},
    {"deep": {"a": {"b": {"c": [[[{"d": 1}]]]}}}},
    {2**63: 1, -(2**63): 2, 2**64 - 1: 3},  # the int key range
]


@pytest.mark.parametrize("tree", STATES)
def test_every_state_shape_round_trips_exactly(tree: dict[Any, Any]) -> None:
    back = roundtrip(tree)
    assert repr(back) == repr(tree) or _equal(back, tree)
    assert list(back) == list(tree)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, Blob) and isinstance(b, Blob):
        return bytes(a.data or b"") == bytes(b.data or b"")
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a))
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def _apply_diff(old: Any, new: Any) -> list[tuple[bytes, bytes]]:
    def value(b: Blob) -> bytes:
        assert b.data is not None
        return sp.pack(["B", b.descriptor(), bytes(b.data)])

    have = dict(sp.items(old, value))
    edits: dict[bytes, bytes | None] = {}
    sp.diff(old, new, value, edits)
    for k, v in edits.items():
        if v is None:
            have.pop(k, None)
        else:
            have[k] = v
    return sorted(have.items())


@pytest.mark.parametrize(("old", "new"), [
    ({"a": 1}, {"a": 1.0}),  # 1 == 1.0 but another type
    ({"a": {"x": 1}}, {"a": [1]}),  # a mapping becomes a list
    ({"a": [1, 2, 3]}, {"a": [1]}),
    ({"a": (1,)}, {"a": [1]}),
    ({"a": 1, "b": 2}, {"b": 2, "a": 1}),  # only the order changed
    ({"a": {"b": {"c": 1}}}, {}),
    ({"a": float("nan")}, {"a": float("nan")}),
])
def test_a_diff_gives_the_items_of_the_new_state(old: dict[Any, Any], new: dict[Any, Any]) -> None:
    def value(b: Blob) -> bytes:
        raise AssertionError

    assert _apply_diff(old, new) == sorted(sp.items(new, value))


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
                        st.text(max_size=3) | st.integers(min_value=-3, max_value=3), kids, max_size=4),
                    max_leaves=20))
def test_any_json_like_state_round_trips(value: Any) -> None:
    tree = {"v": value}
    assert _equal(roundtrip(tree), tree)
    assert _apply_diff({"v": 0, "w": value}, tree) == sorted(sp.items(tree, lambda b: b""))


BIG = {f"k{i:03d}": i for i in range(100)}  # over the size where the diff memoises a mapping's key order


@pytest.mark.parametrize("new", [
    {**BIG, "zzz": 1},  # appended after the rest: still key order, no container edit
    {**BIG, "a": 1},  # appended but sorts first: the order must be stored
    {**BIG, "zzz": 1, "zz": 2},  # appended out of order among themselves
    dict(reversed(BIG.items())),  # the same keys in another order (a Replace)
    {k: v for k, v in BIG.items() if k != "k050"},  # a key removed
])
def test_a_big_mappings_order_follows_it_through_diffs(new: dict[str, int]) -> None:
    def value(b: Blob) -> bytes:
        raise AssertionError

    old = {"m": BIG}
    differ = sp.Differ(value)
    differ.diff(old, {"m": new})
    have = dict(sp.items(old, value))
    for k, v in differ.edits.items():
        if v is None:
            have.pop(k, None)
        else:
            have[k] = v
    assert sorted(have.items()) == sorted(sp.items({"m": new}, value))
    assert list(sp.unflatten(iter(sorted(have.items())), blob, "t")["m"]) == list(new)
    # and again from what the first diff learned (the next save's memo)
    newer = {**new, "zzzz": 0}
    second = sp.Differ(value, differ.memo)
    second.diff({"m": new}, {"m": newer})
    for k, v in second.edits.items():
        if v is None:
            have.pop(k, None)
        else:
            have[k] = v
    assert list(sp.unflatten(iter(sorted(have.items())), blob, "t")["m"]) == list(newer)


# -- editing the tree level by level (what a save does) ---------------------------------------------

TINY = prolly.Params(min_bytes=64, max_bytes=256, q_leaf=3, q_node=3)  # deep trees from few items


def _levels_of(items: dict[bytes, bytes], params: prolly.Params, pages: Pages) -> prolly.Levels:
    return prolly.Levels.build(prolly.chunk_leaves(sorted(items.items()), params, pages.put), params, pages.put)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.binary(min_size=1, max_size=6), st.binary(max_size=40), max_size=300),
       st.lists(st.lists(st.tuples(st.binary(min_size=1, max_size=6), st.none() | st.binary(max_size=40)),
                         max_size=60), min_size=1, max_size=6),
       st.sampled_from([TINY, SMALL]))
def test_an_edited_tree_is_the_tree_a_full_build_gives(start: dict[bytes, bytes],
                                                       batches: list[list[tuple[bytes, bytes | None]]],
                                                       params: prolly.Params) -> None:
    """Incremental edits (leaf pages around the edits, then per level the interior pages around the
    changed refs below, no interior page read) give the root and every level a build from scratch gives,
    over random sequences of inserts, updates and deletes, including trees that gain and lose levels."""
    pages = Pages()
    tree = _levels_of(start, params, pages)
    state = dict(start)
    for batch in batches:
        edits = dict(batch)
        before = dict(pages.pages)
        pages.reads.clear()
        tree = prolly.edit(tree, edits, params, pages.get, pages.put, "t")
        for k, v in edits.items():
            if v is None:
                state.pop(k, None)
            else:
                state[k] = v
        want = _levels_of(state, params, Pages())
        assert tree.root == want.root and tree.refs == want.refs and tree.firsts == want.firsts
        # only leaf pages are read; every page of the tree is stored
        assert all(prolly.decode_page(before[d], d, "t").level == 0 for d in pages.reads)
        assert prolly.load_levels(tree.root, pages.get, "t") == tree
    assert list(prolly.iterate(tree.root, pages.get, "t")) == sorted(state.items())


def test_an_edit_of_a_big_tree_writes_one_page_per_level() -> None:
    pages = Pages()
    tree = _levels_of(kv(100_000), P, pages)
    assert tree.height >= 2
    pages.reads.clear()
    pages.writes.clear()
    new = prolly.edit(tree, {b"key0050000": b"new value", b"key0050001x": b"inserted"}, P, pages.get,
                      pages.put, "t")
    assert len(pages.reads) == 1  # the leaf; interior pages come from the levels in memory
    assert len(pages.writes) == 1 + tree.height
    assert new.refs[0][:10] == tree.refs[0][:10] and new.refs[0][-10:] == tree.refs[0][-10:]


# -- a save that visits only the paths the daemon's merges changed -----------------------------------

_KEYS = st.sampled_from(["a", "b", "c", 1, 2]) | st.text(alphabet="xyz", min_size=1, max_size=2)
_LEAF = st.none() | st.integers(-3, 3) | st.text(max_size=3) | st.lists(st.integers(0, 2), max_size=2)


def _delta_values(depth: int) -> Any:
    if depth == 0:
        return _LEAF | st.just(DELETE)
    sub = st.dictionaries(_KEYS, _delta_values(depth - 1), max_size=3)
    return _LEAF | st.just(DELETE) | sub | sub.map(Replace)


# A big mapping's keys: present, absent between them, after them (appends), so deletes and re-adds meet.
_HISTORY_KEYS = st.sampled_from([f"k{i:03d}" for i in (0, 1, 2, 100, 101, 198, 199, 250, 251, 252)])
_DELTA = st.fixed_dictionaries({}, optional={
    "h": st.dictionaries(_HISTORY_KEYS, st.integers(0, 3) | st.just(DELETE) | st.fixed_dictionaries({"v": _LEAF}),
                         max_size=4),
    "n": st.dictionaries(_KEYS, _delta_values(2), max_size=3),
    "a": _delta_values(1),
})


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_DELTA, max_size=8), min_size=1, max_size=5))
@example([[{"h": {"k000": DELETE}}, {"h": {"k000": 0}}]])  # deleted and added back: now last, out of key order
@example([[{"n": {"a": DELETE}}, {"n": {"a": {"b": 1}}}], [{"n": {"a": DELETE, "b": 2}}]])
# Set, deleted and set again in one snapshot: the key was already recorded whole when its delete came.
@example([[{"h": {}, "a": None, "n": {"b": None}}, {"h": {}, "n": {"c": None}}],
          [{"n": {"b": None}}, {"n": {"b": DELETE}}, {"h": {}, "a": None, "n": {"b": None}}]])
def test_a_diff_of_the_touched_paths_gives_the_full_diffs_items(snapshots: list[list[dict[str, Any]]]) -> None:
    """The daemon records the paths each merge changes (state.touch, before the merge, which may change
    the live tree in place); a diff that visits only those (and keeps its key-order memo by path from save
    to save) gives the items of the new state, like the full diff, over random deltas of nested maps,
    deletions, replacements and a big mapping's appends, inserts and deletes."""
    def value(b: Blob) -> bytes:
        raise AssertionError

    root = counted({"h": {f"k{i:03d}": i for i in range(0, 200, 2)}, "n": {"a": {"b": 1}}, "a": 1})
    have = dict(sp.items(root, value))
    memo: dict[bytes, tuple[Any, bool]] = {}
    gen = 1
    for deltas in snapshots:
        old = root
        gen += 1  # a snapshot holds ``old``: merges copy what they change, once
        touched = Touched()
        for delta in deltas:
            touch(touched, root, delta)
            root = merge_counted(root, delta, gen).root
        differ = sp.Differ(value, dict(memo))
        differ.diff(old, root, touched=touched)
        for k, v in differ.edits.items():
            if v is None:
                have.pop(k, None)
            else:
                have[k] = v
        assert sorted(have.items()) == sorted(sp.items(root, value))
        assert list(sp.new_blobs(old, root, touched)) == list(sp.new_blobs(old, root))
        memo = differ.memo
        for path, (mapping, in_order) in memo.items():  # the memo holds the new tree's mappings, and is right
            assert mapping is _at(root, sp.dec_path(path))
            assert in_order == (list(mapping) == sorted(mapping, key=sp.enc_elem))


def _at(tree: Any, path: tuple[str | int, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


class _NoWalk(dict[Any, Any]):
    """A mapping that may be looked into but never walked: a diff that iterates it fails."""

    def _walk(self, *_args: Any) -> Any:
        raise AssertionError("walked a mapping whose keys were not touched")

    __iter__ = keys = values = items = _walk  # type: ignore[assignment]


def test_a_touched_diff_visits_the_changed_keys_not_the_mapping() -> None:
    def value(b: Blob) -> bytes:
        raise AssertionError

    entries = {f"{i:08d}": {"m": "x" * 20, "s": i} for i in range(20_000)}
    old = {"cp": _NoWalk(entries), "step": 0}
    new = {"cp": _NoWalk({**entries, "00020000": {"m": "new", "s": 1}}), "step": 1}
    touched = Touched()
    touch(touched, {"cp": {}, "step": 0}, {"cp": {"00020000": {"m": "new"}}, "step": 1})
    assert touched == {"cp": {"00020000": None}, "step": None}
    differ = sp.Differ(value, {sp.enc_path(["cp"]): (old["cp"], True)})
    differ.diff(old, new, touched=touched)
    assert set(differ.edits) == {sp.enc_path(p) for p in [("cp", "00020000"), ("cp", "00020000", "m"),
                                                          ("cp", "00020000", "s"), ("step",)]}
    assert differ.memo[sp.enc_path(["cp"])] == (new["cp"], True)  # still in key order: no container edit
    assert list(sp.new_blobs(old, new, touched)) == []


@settings(max_examples=120, deadline=None)
@given(st.lists(st.lists(_DELTA, max_size=8), min_size=1, max_size=5), st.sampled_from([TINY, SMALL]))
@example([[{"h": {"k003": {"v": [1, 2]}, "k300": 1}, "n": {"new": {"a": {"b": None}}}}]], TINY)
def test_a_lazy_diff_edits_the_tree_a_full_build_gives(snapshots: list[list[dict[str, Any]]],
                                                        params: prolly.Params) -> None:
    """A save's diff with new subtrees as :class:`prolly.Insert` (their items made only when the edit's
    chunker reaches them, issue 20) edits the stored tree into the one a build of the new state from
    scratch gives, page for page, over the random deltas of the test above; the eager diff does too."""
    def value(b: Blob) -> bytes:
        raise AssertionError

    root = counted({"h": {f"k{i:03d}": i for i in range(0, 200, 2)}, "n": {"a": {"b": 1}}, "a": 1})
    pages = Pages()
    lazy = eager = prolly.Levels.build(prolly.chunk_leaves(sp.items(root, value), params, pages.put), params, pages.put)
    memo: dict[bytes, tuple[Any, bool]] = {}
    gen = 1
    inserts = 0
    for deltas in snapshots:
        old = root
        gen += 1
        touched = Touched()
        for delta in deltas:
            touch(touched, root, delta)
            root = merge_counted(root, delta, gen).root
        differ = sp.Differ(value, dict(memo), lazy=True)
        differ.diff(old, root, touched=touched)
        inserts += sum(isinstance(v, prolly.Insert) for v in differ.edits.values())
        memo = differ.memo
        lazy = prolly.edit(lazy, differ.edits, params, pages.get, pages.put, "t")
        full: dict[bytes, bytes | None] = {}
        sp.diff(old, root, value, full)
        assert not any(isinstance(v, prolly.Insert) for v in full.values())
        eager = prolly.edit(eager, full, params, pages.get, pages.put, "t")
        want = prolly.Levels.build(prolly.chunk_leaves(sp.items(root, value), params, Pages().put), params,
                                   Pages().put)
        assert lazy.root == eager.root == want.root and lazy.refs == want.refs
    assert list(prolly.iterate(lazy.root, pages.get, "t")) == sorted(sp.items(root, value))


def test_a_lazy_diff_holds_one_insert_per_new_subtree_not_its_items() -> None:
    """New keys that sort after all of a wide mapping's keys (a history's growing ids) are one Insert of
    their run; new keys among the old ones, one Insert each. Never an item of a new subtree."""
    def value(b: Blob) -> bytes:
        raise AssertionError

    old = counted({"cp": {f"{i:08d}": {"m": "x", "s": i} for i in range(0, 200, 2)}})
    for keys, inserts in ((range(200, 500), 1), (range(1, 200, 2), 100)):
        new = merge_counted(old, {"cp": {f"{i:08d}": {"m": "y" * 20, "s": i, "l": [1, 2]} for i in keys}}, 2).root
        touched = Touched()
        touch(touched, old, {"cp": {f"{i:08d}": {} for i in keys}})
        differ = sp.Differ(value, lazy=True)
        differ.diff(old, new, touched=touched)
        assert sum(isinstance(v, prolly.Insert) for v in differ.edits.values()) == inserts
        assert len(differ.edits) <= inserts + 1  # and the mapping's own value at most: no item of a new subtree
        got = [item for k in sorted(differ.edits) if isinstance(v := differ.edits[k], prolly.Insert)
               for item in v.items()]
        had = dict(sp.items(old, value))
        assert got == [kv for kv in sp.items(new, value) if kv[0] not in had]  # in key order, every one


def test_a_lazy_diff_is_freed_by_reference_counting() -> None:
    """No cycle through the Inserts: the daemon's full garbage collections run every 5 minutes, and a
    save's edits must not live that long."""
    import gc
    import weakref

    def value(b: Blob) -> bytes:
        raise AssertionError

    differ = sp.Differ(value, lazy=True)
    differ.diff(counted({"a": 1}), counted({"a": 1, "b": {"c": [1]}}))
    assert any(isinstance(v, prolly.Insert) for v in differ.edits.values())
    gone = weakref.ref(differ)
    gc.disable()
    try:
        del differ
        assert gone() is None
    finally:
        gc.enable()
