"""Deep-merge of deltas into a job's state, without ever mutating a tree a snapshot may hold, and the
incremental accounting of what a state costs.

``merge`` copies only the mappings along the paths a delta touches (path copying) and shares the rest,
so a merge costs O(size of the delta) and taking a snapshot of a job is just keeping a reference to its
current root. That is what makes an update atomic for free: the daemon applies a whole delta in one
step of its event loop, and a save works from the root it grabbed, which no later merge can change.
Copying a mapping costs its size, though, and one mapping can hold a whole history (an agent's 100,000
checkpoints): the daemon's merges (``merge_counted`` with a generation) copy a mapping only the first
time after a snapshot, and change in place what they built since.

**Accounting (issue 19).** The mappings of a daemon-held state (but small flat ones, below) are
:class:`Node` objects: dicts that carry the totals of their subtree (``cost``: encoded bytes, what
``quota.max_bytes`` counts; ``held``: bytes of binary leaves in daemon memory; ``refs``: how many
binary leaves live in each client shared-memory mapping).
Cached per subtree, not kept in a side table keyed by path: a subtree is shared between versions of
the tree by path copying, and its totals travel with it for free, so the cost of a replaced subtree is
one attribute read, and a merge adjusts the totals on exactly the paths it copies. A side table would
have to be copied or versioned along with the tree it describes (snapshots hold old roots), and a
per-key table would cost a second dict per mapping. The price: three slots per mapping (24 bytes).

A mapping of at most ``FLAT_MAX`` (16) scalar values stays a plain dict and is measured when needed (at
most 16 entries): CPython's garbage collector never tracks such a dict, but tracks every instance of a
dict subclass, and 600,000 tracked tiny maps made every collection walk them (a ping took 3x as long
beside them). Every other mapping is a :class:`Node`, which the collector tracks anyway (it holds
containers, or is large). The root is always a Node.

Only Nodes carry totals. Every other value is a leaf (lists and tuples too: a merge replaces them
whole) whose cost :func:`measure` computes from the value itself; a leaf is measured once when it
arrives and once when it is replaced or deleted, so that work is at most twice the work of the request
that brought it (amortised O(the request)), never a walk of the rest of the tree.

A merge into a counted root gives a counted root (:func:`merge_counted` also says what changed); a
merge into a plain root stays plain and uncounted (storage's log replay, whose result the daemon
counts once with :func:`counted` when it loads the job).

**Packed subtrees (issue 20: RSS growth over a history <= 2x its payload).** A mapping, list or tuple
that a merge adds under a new key of a mapping already holding :data:`PACK_WIDTH` (64) keys, or that
:func:`counted` finds there when a job loads, is kept as one :class:`~autosaved.tree.Packed` object: its
msgpack encoding (small bytes leaves inline) behind a header with its ``cost``, ``held`` and kind. One
LangGraph checkpoint was a record Node, four lists, four Blobs and their bytes objects and a parent id
string (~1.4 KB of objects beside its ~2.2 KB payload); it is now three bytes objects. The merge also puts
the Packed into the delta in place of the subtree it stands for, so the pending log delta of updates at
``accepted`` holds the same object instead of a second tree until the next save. A Packed stands for
exactly the tree it opens to, everywhere: encoders (``to_node``: replies, log records, format 1) encode
that tree; a merge of a mapping into a packed mapping opens it (counted) and merges, and a packed delta
value meeting a mapping opens too, so a plan made against an older root applies right; a merge of deltas
keeps a packed value shared only where its key is new; restore by path, the save's diff, its blob walk
and the change check open it where they reach it. Only subtrees whose leaves are scalars and bytes leaves
in daemon memory pack, up to :data:`PACK_MAX` encoded bytes (a read or a merge into one opens O(16 KiB) at
most): a leaf in a client slot (counted in ``refs``), an array, a leaf stored only in chunk files, a big
int or a ``DELETE`` keeps its subtree a tree. Narrow mappings (a trainer's state, a stage's progress)
never pack: their subtrees are few and hot.

Why at the merge, and not the proposed compaction of cold subtrees after a save (to their encoding, or
dropped to page references the cache reloads): a history is filled between saves (``bench history``
puts 90,000 checkpoints at ``accepted`` before one), so compacting after the save leaves the daemon's
peak, and with it its RSS (pymalloc keeps an arena while any object in it lives), where it was, and the
pending log delta holds the unpacked subtrees until that save anyway. Page references would add I/O to
every reader above (merges and the change check run on the event loop) and read a whole page (many
checkpoints) to serve one. Packing at the merge costs each new subtree one C-level encoding (~5 us) when
it arrives and ~3 us to open one for a read; ``scripts/rss_per_checkpoint.py --checkpoints
1000,10000,100000``: 4,977 B of RSS per checkpoint (2.24x the payload) before, 3,383 B (1.52x) after.
"""

from __future__ import annotations

import mmap
from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from .tree import DELETE, MSGPACK_INT_MAX, MSGPACK_INT_MIN, PLAIN_TYPES, Blob, Packed, Replace, Walked, pack_subtree

State = dict[str | int, Any]
# Client shared-memory mapping (``id()`` of the mmap a blob's bytes live in) -> how many leaves use it.
Refs = dict[int, int]

# What a binary leaf costs beyond its bytes: its node and its descriptor (kind, dtype, shape, nbytes).
BLOB_OVERHEAD: Final = 64
# A mapping of at most this many scalar values stays a plain dict: CPython's garbage collector never
# tracks those (it tracks every instance of a dict subclass), so 600,000 tiny maps cost it nothing, as before.
FLAT_MAX: Final = 16
# A mapping, list or tuple a merge adds under a new key of a mapping that already has this many keys is
# kept packed (see the module docstring), when its encoded size is at most PACK_MAX.
PACK_WIDTH: Final = 64
PACK_MAX: Final = 16384
# Kept in sync with the node form of tree.to_node: {"m": [[key, value], ...]}, {"l": [...]}, {"t": [...]}.
_CONTAINER: Final = 3  # the one-key map header and its tag
_ITEM: Final = 1  # the [key, value] pair's array header


class Node(dict[str | int, Any]):
    """A mapping of a daemon-held state with its subtree's totals (see the module docstring; a small
    flat mapping is a plain dict instead). Never mutated once built; build one with :func:`empty_node`,
    :func:`counted` or a merge."""

    __slots__ = ("cost", "gen", "held", "refs")
    cost: int
    held: int
    refs: Refs | None
    # The merge generation that built it (see merge_counted): 0 for a Node that may be shared.
    gen: int


def empty_node() -> Node:
    node = Node()
    node.cost, node.held, node.refs, node.gen = _CONTAINER + 1, 0, None, 0
    return node


def _array_header(n: int) -> int:
    return 1 if n < 16 else 3 if n < 65536 else 5


def _str_cost(s: str) -> int:
    n = len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


def _int_cost(v: int) -> int:
    if -32 <= v < 128:
        return 1
    if -(2**7) <= v < 2**8:
        return 2
    if -(2**15) <= v < 2**16:
        return 3
    if -(2**31) <= v < 2**32:
        return 5
    if MSGPACK_INT_MIN <= v <= MSGPACK_INT_MAX:
        return 9
    # {"I": "digits"}: a decimal string, sized from the bit length (no str(), quadratic in the digits).
    digits = v.bit_length() * 30103 // 100000 + 2
    return _CONTAINER + 3 + digits


def key_cost(key: str | int) -> int:
    return _ITEM + (_str_cost(key) if type(key) is str else _int_cost(key))  # type: ignore[arg-type]


def add_refs(into: Refs | None, refs: Refs | None, sign: int = 1) -> Refs | None:
    """``into`` plus (or minus) ``refs``, as a new dict (``into`` may be shared); ``None`` when empty."""
    if not refs:
        return into
    out = dict(into) if into else {}
    for mapping, n in refs.items():
        left = out.get(mapping, 0) + sign * n
        if left:
            out[mapping] = left
        else:
            del out[mapping]
    return out or None


def measure(value: Any) -> tuple[int, int, Refs | None]:
    """(cost, held, refs) of any value of a state: a Node's cached totals, a leaf's from the leaf.

    The cost is the value's encoded size in the node form (what a save or a restore of it carries):
    every scalar, every key and every container counts, an empty one too; a binary leaf counts its
    bytes plus :data:`BLOB_OVERHEAD`."""
    t = type(value)
    if t is Node:
        return value.cost, value.held, value.refs
    if t is str:
        return _str_cost(value), 0, None
    if t is int:
        return _int_cost(value), 0, None
    if value is None or t is bool:
        return 1, 0, None
    if t is float:
        return 9, 0, None
    if t is Packed:
        return value.cost, value.held, None
    if t is Blob:
        data = value.buffer
        if data is None:
            return value.nbytes + BLOB_OVERHEAD, 0, None
        refs = {id(data.obj): 1} if type(data) is memoryview and isinstance(data.obj, mmap.mmap) else None
        return value.nbytes + BLOB_OVERHEAD, value.nbytes, refs
    if t is dict:
        return _measure_items(value.items(), mapping=True)
    if t is list or t is tuple:  # before the ABC check below, which is slow (perf, issue 21)
        return _measure_items(value, mapping=False)
    if isinstance(value, Mapping):
        return _measure_items(value.items(), mapping=True)
    if isinstance(value, list | tuple):
        return _measure_items(value, mapping=False)
    if isinstance(value, Replace):
        return measure(value.mapping)
    if value is DELETE:
        return _CONTAINER + 2, 0, None
    return 9, 0, None  # nothing else reaches a state (tree.to_node refuses it)


def _measure_items(items: Any, *, mapping: bool) -> tuple[int, int, Refs | None]:
    n = cost = held = 0
    refs: Refs | None = None
    Walked.entries += len(items)
    for item in items:
        n += 1
        if mapping:
            key, item = item
            cost += key_cost(key)
        c, h, r = measure(item)
        cost, held = cost + c, held + h
        if r:
            refs = add_refs(refs, r)
    return cost + _CONTAINER + _array_header(n), held, refs


def unpacked(value: Packed) -> Any:
    """A :class:`Packed` subtree as the counted tree it stands for (its mappings Nodes or small plain dicts,
    as a merge builds them), to merge into."""
    tree = value.open()
    return _counted(tree)[0] if isinstance(tree, dict) else tree


def _pack_new(value: Any) -> Packed | None:
    """``value`` packed, when it is a mapping, list or tuple that may be (module docstring), else ``None``."""
    t = type(value)
    if t is not dict and t is not list and t is not tuple:
        return None
    c, h, r = measure(value)  # counts the entries it walks: a yield point of the long walks follows
    if Walked.entries >= Walked.step_at:
        Walked.step()
    return pack_subtree(value, c, h) if r is None and c <= PACK_MAX else None


def _small_flat(out: dict[str | int, Any]) -> bool:
    """Whether a mapping stays a plain dict: at most :data:`FLAT_MAX` entries, all scalars (O(FLAT_MAX))."""
    return len(out) <= FLAT_MAX and all(type(v) in PLAIN_TYPES for v in out.values())


def _finish(out: dict[str | int, Any], items: int, held: int, refs: Refs | None,
            force: bool = False) -> tuple[Any, int, int, Refs | None]:
    """A built mapping with its totals (``items``: the cost of its entries): a plain dict when small and
    flat (measured again in O(FLAT_MAX) when needed, and untracked by the garbage collector), else a Node."""
    cost = items + _CONTAINER + _array_header(len(out))
    if not force and _small_flat(out):
        return (dict(out) if type(out) is Node else out), cost, 0, None
    if type(out) is Node:
        node = out
    else:
        node = Node(out)
        node.gen = 0
    node.cost, node.held, node.refs = cost, held, refs
    return node, cost, held, refs


def counted(tree: Any) -> Any:
    """``tree`` with every mapping counted (a walk of the whole tree: for a job's state as storage loaded
    it, once, when the daemon loads the job). The root is always a :class:`Node`."""
    if not isinstance(tree, Mapping):
        return tree
    return _counted(tree, force=True)[0]


def _counted(tree: Mapping[str | int, Any], force: bool = False) -> tuple[Any, int, int, Refs | None]:
    Walked.entries += len(tree)
    out: dict[str | int, Any] = {}
    cost = held = 0
    refs: Refs | None = None
    wide = len(tree) >= PACK_WIDTH
    for key, value in tree.items():
        # A loaded state is all cold: its wide mappings' subtrees pack.
        packed = _pack_new(value) if wide else None
        if packed is not None:
            value, c, h, r = packed, packed.cost, packed.held, None
        elif isinstance(value, Mapping):
            value, c, h, r = _counted(value)
        else:
            c, h, r = measure(value)
        out[key] = value
        cost += key_cost(key) + c
        held += h
        if r:
            refs = add_refs(refs, r)
    return _finish(out, cost, held, refs, force)


class Merged(NamedTuple):
    """What :func:`merge_counted` made: the new root, and the change of the paths it touched (a tuple:
    a frozen dataclass's init cost a third of a small update's merge)."""

    root: Node
    cost: int  # the root's cost after minus before
    held: int
    # Leaves in client mappings that the merge brought in / took out (their difference changes ``root.refs``).
    added_refs: Refs | None
    removed_refs: Refs | None


def merge_counted(base: Node, delta: Mapping[str | int, Any], gen: int = 0) -> Merged:
    """:func:`merge` into a counted tree, with the change it made. Work: the delta's size, plus the
    leaves it replaces or deletes (see the module docstring); the rest of ``base`` is never visited.

    ``gen`` (issue 20): path copying copies each mapping on the delta's paths, O(its size): a history
    of 100,000 checkpoints in one mapping made every update copy 100,000 entries (and the garbage
    collector then walk the copy). With ``gen`` > 0 a mapping this merge's generation built is changed in
    place instead, and the mappings it copies are stamped with ``gen``; the caller starts a new generation
    whenever something keeps a reference to the tree beyond the current step (a save's snapshot), so no
    tree anyone holds ever changes, and a mapping is copied once per snapshot, not once per update. An
    in-place merge leaves ``base`` changed: it is for the job's own live tree, applied at once (a merge
    that may be refused, like the quota's plan, takes ``gen`` 0)."""
    added: list[Refs | None] = [None]
    removed: list[Refs | None] = [None]
    base_cost, base_held = base.cost, base.held  # before an in-place merge changes them
    root, cost, held, _ = _merge_node(base, base_cost, base_held, base.refs, delta, added, removed, True, gen)
    return Merged(root, cost - base_cost, held - base_held, added[0], removed[0])


def _merge_node(base: dict[str | int, Any], base_cost: int, base_held: int, base_refs: Refs | None,
                delta: Mapping[str | int, Any], added: list[Refs | None], removed: list[Refs | None],
                force: bool = False, gen: int = 0) -> tuple[Any, int, int, Refs | None]:
    Walked.entries += len(delta)
    if Walked.entries >= Walked.step_at:
        Walked.step()
    out: dict[str | int, Any]
    if type(base) is Node and gen and base.gen == gen:
        out = base  # built by this generation: no snapshot holds it
    else:
        Walked.copied += len(base)
        out = Node(base) if type(base) is Node else dict(base)
        if type(out) is Node:
            out.gen = gen
    cost, held, refs = base_cost - _CONTAINER - _array_header(len(base)), base_held, base_refs
    wide = len(out) >= PACK_WIDTH
    for key, value in delta.items():
        old = out.get(key, _MISSING)
        t = type(value)
        if t is Packed and value.is_mapping and _is_mapping(old):
            value = value.open()  # merged into what the key holds, as the tree it stands for
            t = type(value)
        packed = _pack_new(value) if old is _MISSING and wide else None
        if packed is not None:
            out[key] = packed
            cost += key_cost(key) + packed.cost
            held += packed.held
            if type(delta) is dict:
                # The delta the job logs holds the same object (its meaning is the same tree): the
                # pending log delta of updates at ``accepted`` then costs no second copy of the subtree.
                delta[key] = packed
            continue
        if old is not _MISSING:  # what the key held goes
            cost -= key_cost(key)
            to = type(old)
            if to is str:
                cost -= _str_cost(old)
            elif to is int:
                cost -= _int_cost(old)
            elif to in PLAIN_TYPES:
                cost -= 9 if to is float else 1
            else:
                c, h, r = measure(old)  # a Node's totals, or a small flat dict's (O(FLAT_MAX))
                cost, held = cost - c, held - h
                if (to is not Node and to is not dict) or t is Replace or t in PLAIN_TYPES \
                        or (t is not dict and not isinstance(value, Mapping)):  # replaced or deleted whole
                    if r:
                        removed[0] = add_refs(removed[0], r)
                        refs = add_refs(refs, r, -1)
                elif r:  # merged into below: its leaves that go are counted there; its totals come back
                    refs = add_refs(refs, r, -1)
        if t in PLAIN_TYPES:  # the common case first: the ABC checks below are slow (perf, issue 14)
            out[key] = value
            cost += key_cost(key) + (_str_cost(value) if t is str else _int_cost(value) if t is int
                                     else 9 if t is float else 1)
            continue
        if value is DELETE:
            out.pop(key, None)
            continue
        if t is Replace:
            new, c, h, r = _fresh(value.mapping, added)
        elif t is dict or isinstance(value, Mapping):  # the exact type first: an ABC check is slow
            to = type(old)
            if to is Packed and old.is_mapping:
                old = unpacked(old)
                to = type(old)
            if to is Node:
                new, c, h, r = _merge_node(old, old.cost, old.held, old.refs, value, added, removed, gen=gen)
            elif to is dict:  # a small flat map
                oc, oh, orf = measure(old)
                new, c, h, r = _merge_node(old, oc, oh, orf, value, added, removed, gen=gen)
            else:
                new, c, h, r = _fresh(value, added)
        else:
            new = value
            c, h, r = measure(value)
            if r:
                added[0] = add_refs(added[0], r)
        out[key] = new
        cost += key_cost(key) + c
        held += h
        if r:
            refs = add_refs(refs, r)
    return _finish(out, cost, held, refs, force)


def _fresh(delta: Mapping[str | int, Any], added: list[Refs | None]) -> tuple[Any, int, int, Refs | None]:
    """``_merge_node`` into an empty mapping, faster: a new subtree needs no look-up of what it replaces
    (most of an update that adds many small maps is here)."""
    Walked.entries += len(delta)
    if Walked.entries >= Walked.step_at:
        Walked.step()
    out: dict[str | int, Any] = {}
    cost = held = 0
    refs: Refs | None = None
    wide = len(delta) >= PACK_WIDTH  # a new mapping as wide as those whose new subtrees pack
    for key, value in delta.items():
        t = type(value)
        if t is str:
            n = len(value)
            c = n + 1 if n < 32 and value.isascii() else _str_cost(value)
        elif t is int:
            c = 1 if -32 <= value < 128 else _int_cost(value)
        elif t is float:
            c = 9
        elif t in PLAIN_TYPES:
            c = 1
        elif value is DELETE:
            continue
        else:
            packed = _pack_new(value) if wide else None
            if packed is not None:
                value, c, h, r = packed, packed.cost, packed.held, None
                if type(delta) is dict:
                    delta[key] = packed  # shared with the pending log delta, as in _merge_node
            elif t is Replace:
                value, c, h, r = _fresh(value.mapping, added)
            elif t is dict or isinstance(value, Mapping):
                value, c, h, r = _fresh(value, added)
            else:
                c, h, r = measure(value)
                if r:
                    added[0] = add_refs(added[0], r)
            held += h
            if r:
                refs = add_refs(refs, r)
        out[key] = value
        if type(key) is str and len(key) < 32 and key.isascii():
            cost += c + 2 + len(key)
        else:
            cost += c + key_cost(key)
    return _finish(out, cost, held, refs)


def _is_mapping(value: Any) -> bool:
    t = type(value)
    return t is Node or t is dict or (t is Packed and value.is_mapping) or (
        t is not Packed and t not in PLAIN_TYPES and isinstance(value, Mapping))


def merge(base: State, delta: Mapping[str | int, Any]) -> State:
    """Return ``base`` with ``delta`` deep-merged: mappings merge, other values replace, DELETE removes,
    a :class:`Replace` sets a mapping wholesale. A counted ``base`` (:class:`Node`) gives a counted tree."""
    if type(base) is Node:
        return merge_counted(base, delta).root
    out = dict(base)
    for key, value in delta.items():
        if type(value) is Packed and value.is_mapping and _is_mapping(out.get(key)):
            value = value.open()
        if type(out.get(key)) is Packed and isinstance(value, Mapping):
            out[key] = out[key].open()
        if type(value) in PLAIN_TYPES:  # the common case first: the ABC check below is slow (perf, issue 14)
            out[key] = value
        elif value is DELETE:
            out.pop(key, None)
        elif isinstance(value, Replace):
            out[key] = merge({}, value.mapping)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge({}, value)
        else:
            out[key] = value
    return out


def merge_deltas(first: Mapping[str | int, Any], second: Mapping[str | int, Any]) -> State:
    """One delta with the effect of applying ``first`` then ``second``.

    A mapping that follows a DELETE or a non-mapping value must replace, not merge (merging it onto
    whatever the key held before ``first`` would resurrect deleted keys), hence :class:`Replace`.
    """
    Walked.copied += len(first)
    out = dict(first)
    for key, value in second.items():
        if type(value) in PLAIN_TYPES:
            out[key] = value
            continue
        before = out.get(key, _MISSING)
        value, before = _unpack_pair(value, before)
        if value is DELETE or isinstance(value, Replace) or not isinstance(value, Mapping) or before is _MISSING:
            out[key] = value
        elif isinstance(before, Replace):
            out[key] = Replace(merge(before.mapping, value))
        elif isinstance(before, Mapping):
            out[key] = merge_deltas(before, value)
        else:  # DELETE or a plain value came first
            out[key] = Replace(merge({}, value))
    return out


def _unpack_pair(value: Any, before: Any) -> tuple[Any, Any]:
    """(value, before) of a merge of deltas, a :class:`Packed` one opened where it meets the other: a packed
    value stays shared only where it is new (nothing to merge it with, and a ``Replace`` is not needed
    after nothing); a packed ``before`` opens where a mapping merges into it."""
    if type(value) is Packed and before is not _MISSING:
        value = value.open()
    if type(before) is Packed and type(value) is not Replace and value is not DELETE and isinstance(value, Mapping):
        before = before.open()
    return value, before


class _Owned(dict[str | int, Any]):
    """A mapping of a job's pending log delta built by :func:`merge_deltas_into`: only that delta holds it,
    so the next merge changes it in place."""

    __slots__ = ()


def merge_deltas_into(first: State, second: Mapping[str | int, Any]) -> State:
    """:func:`merge_deltas`, changing in place the mappings an earlier call built (issue 20: copying them
    made each update at ``accepted`` cost every update since the last log record or save, so 90,000 puts
    without a save took quadratic time). For the job's own ``unlogged``, which nothing else holds until it
    is taken whole (the log record takes it, and a new one starts). Mappings of ``second`` it keeps are
    copied before they are changed, so a caller's delta never changes."""
    if type(first) is _Owned:
        out = first
    else:
        Walked.copied += len(first)
        out = _Owned(first)
    for key, value in second.items():
        t = type(value)
        if t in PLAIN_TYPES:
            out[key] = value
            continue
        before = out.get(key, _MISSING)
        value, before = _unpack_pair(value, before)
        t = type(value)
        # Exact types before the ABC checks (perf, issue 21: they were most of this walk).
        if before is _MISSING or (t is not dict and (value is DELETE or isinstance(value, Replace)
                                                     or not isinstance(value, Mapping))):
            out[key] = value
        elif type(before) is _Owned or type(before) is dict:
            out[key] = merge_deltas_into(before, value)
        elif isinstance(before, Replace):
            out[key] = Replace(merge(before.mapping, value))
        elif isinstance(before, Mapping):
            out[key] = merge_deltas_into(before, value)  # type: ignore[arg-type]
        else:  # DELETE or a plain value came first
            out[key] = Replace(merge({}, value))
    return out


_MISSING: Any = object()


class Touched(dict[str | int, "Touched | None"]):
    """The paths a job's updates changed since its last snapshot (issue 20: a save then visits only those,
    not every key of a 100,000-entry mapping). A key maps to the ``Touched`` of a mapping merged into, or
    to ``None``: its whole subtree may differ (added, replaced or deleted). ``dropped``: a key of this
    mapping was deleted, so its key order may have changed (a save then compares the mapping whole)."""

    __slots__ = ("dropped",)

    def __init__(self) -> None:
        super().__init__()
        self.dropped = False


def touch(touched: Touched, base: Mapping[str | int, Any], delta: Mapping[str | int, Any]) -> None:
    """Add the paths merging ``delta`` into ``base`` changes to ``touched`` (before the merge: an in-place
    merge changes ``base``). O(the delta); a key new to ``base`` is recorded as a whole subtree."""
    for key, value in delta.items():
        sub = touched.get(key, _MISSING)
        # Before the skip below: a key already recorded whole and now deleted still moves the mapping's key
        # order when it comes back (hypothesis found set, delete, set again in one snapshot).
        if value is DELETE and key in base:
            touched.dropped = True
        if sub is None:
            continue
        before = base.get(key, _MISSING)
        t = type(value)
        merged_into = (t is dict or (t not in PLAIN_TYPES and t is not Replace and isinstance(value, Mapping))) \
            and isinstance(before, dict)  # the exact types first: an ABC check is slow
        if not merged_into:
            touched[key] = None
        else:
            if sub is _MISSING:
                sub = touched[key] = Touched()
            touch(sub, before, value)


def touched_union(older: Touched, newer: Touched) -> Touched:
    """The paths of ``older`` and ``newer`` (a failed save's paths given back to the next one)."""
    out = Touched()
    out.dropped = older.dropped or newer.dropped
    for src, other in ((older, newer), (newer, older)):
        for key, sub in src.items():
            if key in out:
                continue
            theirs = other.get(key, _MISSING)
            if sub is None or theirs is None:
                out[key] = None
            elif theirs is _MISSING:
                out[key] = sub
            else:
                out[key] = touched_union(sub, theirs)
    return out


# Binary leaves up to this size are compared byte for byte when resent; larger ones count as changed (a
# compare of a large tensor would hold the event loop for about a millisecond per MiB, and a resent large
# tensor costs a version but no disk: its chunks dedup).
COMPARE_BLOB_BYTES = 1 << 20


def changes_anything(base: State, delta: Mapping[str | int, Any]) -> bool:
    """Whether merging ``delta`` into ``base`` would change it (issue 22: resending ``{"a": 1}`` or
    deleting a missing key must not make a version). O(the delta)."""
    for key, value in delta.items():
        before = base.get(key, _MISSING)
        if type(before) is Packed:
            before = before.open()
        if type(value) is Packed:
            if before is _MISSING:
                return True
            value = value.open()
        if value is DELETE:
            if before is not _MISSING:
                return True
        elif type(value) in PLAIN_TYPES:
            # ``1 == True == 1.0`` but they are different leaves; NaN != NaN counts as a change.
            if type(before) is not type(value) or before != value:
                return True
        elif before is _MISSING:
            return True
        elif type(value) is dict or (not isinstance(value, Replace) and isinstance(value, Mapping)):
            if not isinstance(before, dict) or changes_anything(before, value):
                return True
        elif isinstance(value, Replace) or not _same_leaf(before, value):
            return True
    return False


def _same_leaf(before: Any, value: Any) -> bool:
    if isinstance(value, Blob):
        if not (isinstance(before, Blob) and before.kind == value.kind and before.dtype == value.dtype
                and before.shape == value.shape and value.nbytes <= COMPARE_BLOB_BYTES
                and before.data is not None and value.data is not None):
            return False
        try:
            return bool(before.data.cast("B") == value.data.cast("B"))
        except (TypeError, ValueError):  # not a contiguous byte view: say changed rather than copy it
            return False
    if isinstance(value, list | tuple):
        return (type(before) is type(value) and len(before) == len(value)
                and all(_same_leaf(b, v) for b, v in zip(before, value, strict=True)))
    if type(value) in PLAIN_TYPES:
        return type(before) is type(value) and bool(before == value)
    return False
