"""A state tree as the sorted items of a prolly tree (format 2): one item per node, keyed by its path.

Keys: a path encoded so that byte order is a depth-first order of the tree and every node's descendants
follow it contiguously (``[enc(path), enc(path) + b"\\x03")``): each element is ``\\x01`` + 9 bytes
big-endian of ``int + 2**63`` (a mapping's int key or a list/tuple index), or ``\\x02`` + UTF-8 with
``\\x00`` escaped as ``\\x00\\xff`` + ``\\x00``. So ``1`` and ``"1"`` are different keys, as in format 1.

Values (msgpack): ``["m"]`` / ``["m", [keys...]]`` a mapping (the keys in insertion order, only when
that is not the key order, so the state comes back exactly as it was built), ``["l"]`` a list,
``["t"]`` a tuple, ``["s", node]`` a scalar (its :mod:`autosaved.tree` node: NaN and big ints as there),
``["b", record]`` a binary leaf stored as chunks (the format-1 blob record), ``["B", descriptor, bytes]``
a small binary leaf inline in the page (no chunk file, no object per value).

A save diffs the new tree against the tree of the previous save by identity first: the daemon's merge
copies only the paths an update touches (:mod:`autosaved.state`), so unchanged subtrees are the same
objects and are skipped without a look inside. Given the paths the daemon's merges changed
(:class:`autosaved.state.Touched`), a mapping's diff visits only those keys: the work is O(the change),
not the width of the mappings on changed paths (a history of 100,000 checkpoints is one mapping).
New keys that sort after all of a mapping's keys are one lazy edit of their run, and a packed subtree
(:class:`autosaved.tree.Packed`, see :mod:`autosaved.state`) is read as the tree it stands for, opened
only when its items are made: its leaves are all inline, so what it adds to a version's ``bytes`` is its
``held``, counted unopened.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, cast

import msgpack

from ..errors import CorruptVersion
from ..tree import Blob, Packed, from_node, to_node
from . import prolly

if TYPE_CHECKING:
    from ..state import Touched

# Binary leaves up to this size live in the page (a LangGraph checkpoint's values, a step's JSON).
INLINE_MAX: Final = 2048
_INT_OFFSET: Final = 2**63
SUBTREE_END: Final = b"\x03"


def enc_elem(elem: str | int) -> bytes:
    if type(elem) is str:
        return b"\x02" + elem.encode("utf-8", "surrogatepass").replace(b"\x00", b"\x00\xff") + b"\x00"
    assert isinstance(elem, int)
    return b"\x01" + (elem + _INT_OFFSET).to_bytes(9, "big")


def enc_path(path: tuple[str | int, ...] | list[str | int]) -> bytes:
    return b"".join(enc_elem(p) for p in path)


def dec_path(key: bytes) -> tuple[str | int, ...]:
    out: list[str | int] = []
    i = 0
    while i < len(key):
        tag = key[i]
        if tag == 1:
            out.append(int.from_bytes(key[i + 1 : i + 10], "big") - _INT_OFFSET)
            i += 10
        elif tag == 2:
            j = i + 1
            buf = bytearray()
            while True:
                z = key.index(b"\x00", j)
                buf += key[j:z]
                if z + 1 < len(key) and key[z + 1] == 0xFF:
                    buf += b"\x00"
                    j = z + 2
                else:
                    i = z + 1
                    break
            out.append(buf.decode("utf-8", "surrogatepass"))
        else:
            raise ValueError(f"bad path element tag {tag}")
    return tuple(out)


def pack(value: Any) -> bytes:
    out: bytes = msgpack.packb(value, use_bin_type=True)
    return out


def _sorted_keys(mapping: dict[Any, Any]) -> list[Any]:
    return sorted(mapping, key=enc_elem)


def container_value(node: Any) -> bytes:
    if isinstance(node, dict):
        keys = list(node)
        return pack(["m"] if keys == _sorted_keys(node) else ["m", keys])
    return pack(["l"] if isinstance(node, list) else ["t"])


BlobValue = Callable[[Blob], bytes]


def _children(node: Any) -> Iterator[tuple[str | int, Any]]:
    if isinstance(node, dict):
        for key in _sorted_keys(node):
            yield key, node[key]
    else:
        yield from enumerate(node)


def _kind(node: Any) -> type:
    """dict, list or tuple: what a container is to the format (the daemon's counted mappings subclass dict)."""
    return dict if isinstance(node, dict) else (list if isinstance(node, list) else tuple)


def is_container(node: Any) -> bool:
    return isinstance(node, dict | list | tuple)


def scalar_value(value: Any) -> bytes:
    node, _ = to_node(value)
    return pack(["s", node])


def items(tree: Any, blob_value: BlobValue, prefix: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
    """Every item of ``tree`` in key order (the full build)."""
    if type(tree) is Packed:
        tree = tree.open()
    if is_container(tree):
        yield prefix, container_value(tree)
        for key, sub in _children(tree):
            yield from items(sub, blob_value, prefix + enc_elem(key))
    elif isinstance(tree, Blob):
        yield prefix, blob_value(tree)
    else:
        yield prefix, scalar_value(tree)


def _same_leaf(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Blob) or isinstance(b, Blob) or is_container(a) or is_container(b):
        return False
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


_IN_ORDER: Final = pack(["m"])


class Differ:
    """One save's diff: the edits, and a memo of which big mappings are in key order, by path (holding
    each mapping, checked by identity: a path whose mapping was replaced misses). The memo is the cached
    tree's: kept from save to save, updated where this diff visits (the untouched paths hold the same
    mappings as before) and pruned where it deletes.

    With ``touched`` (:class:`autosaved.state.Touched`: the paths the daemon's merges changed since the
    cached tree) a mapping's diff visits only its touched keys: a save costs the paths that changed, not
    the width of the mappings on them."""

    def __init__(self, blob_value: BlobValue, memo: dict[bytes, tuple[Any, bool]] | None = None,
                 lazy: bool = False) -> None:
        self.blob_value = blob_value
        self.edits: dict[bytes, prolly.Edit] = {}
        self.memo: dict[bytes, tuple[Any, bool]] = {} if memo is None else memo
        # With ``lazy``, a subtree under a key ``old`` lacks is one :class:`prolly.Insert` (its items made
        # when :func:`prolly.edit` reaches it), not its items: a save's memory follows a page, not the
        # change (issue 20). Without: every edit is a value or ``None`` (what :func:`diff` gives).
        self.lazy = lazy
        # One function for every Insert, and not a bound method: an Insert that held the Differ would make
        # a cycle (Differ -> edits -> Insert -> Differ) that only a full collection frees (the daemon's run
        # every 5 minutes), keeping a save's edits that long.
        self._expand: Callable[[Any, bytes], Iterator[tuple[bytes, bytes]]] = \
            lambda sub, key: items(sub, blob_value, key)
        self._expand_run: Callable[[Any, bytes], Iterator[tuple[bytes, bytes]]] = \
            lambda run, _key: _run_items(run, blob_value)

    def _add(self, sub: Any, key: bytes) -> None:
        """The items of ``sub``, new at ``key`` (nothing was at or under ``key``)."""
        if self.lazy:
            self.edits[key] = prolly.Insert(sub, key, self._expand)
        else:
            self.edits.update(items(sub, self.blob_value, key))

    def _in_key_order(self, mapping: dict[Any, Any], prefix: bytes) -> bool:
        hit = self.memo.get(prefix)
        if hit is not None and hit[0] is mapping:
            return hit[1]
        return list(mapping) == _sorted_keys(mapping)

    def _learn(self, prefix: bytes, new: dict[Any, Any], in_order: bool) -> None:
        if len(new) > 64:
            self.memo[prefix] = (new, in_order)
        else:
            self.memo.pop(prefix, None)

    def _dict_value(self, old: dict[Any, Any], new: dict[Any, Any], prefix: bytes,
                    added: list[Any] | None = None) -> bytes | None:
        """``new``'s container value when it differs from ``old``'s, else ``None``. The common case costs
        O(the keys added): ``new`` is ``old`` with keys appended (what a merge makes), ``old`` was in key
        order, and the appended keys sort after the rest (ids that grow, like a history's). ``added``:
        those keys when known (a touched diff without deletions), else found by a set difference."""
        if len(old) > 64:
            if added is None:
                more = new.keys() - old.keys()
                tail = list(new)[len(old):]
                appended = len(new) == len(old) + len(more) and list(new)[: len(old)] == list(old)
            else:
                tail = list(itertools.islice(reversed(new), len(added)))[::-1]
                appended = len(new) == len(old) + len(added)
            if appended and self._in_key_order(old, prefix) and _sorted_after(old, tail):
                self._learn(prefix, new, True)
                return None  # ["m"] before and after
        value = container_value(new)
        self._learn(prefix, new, value == _IN_ORDER)
        return None if value == container_value(old) else value

    def diff(self, old: Any, new: Any, prefix: bytes = b"", touched: Touched | None = None) -> None:
        """Put into ``edits`` what turns the items of ``old`` into those of ``new`` (``None``: delete)."""
        if old is new:
            return
        if type(old) is Packed or type(new) is Packed:
            if type(old) is type(new) and old == new:
                return  # the same bytes: the same tree
            # The trees they stand for (new objects: their leaves differ by identity, so a leaf is written
            # again when unchanged; the pages come out the same).
            old, new = (v.open() if type(v) is Packed else v for v in (old, new))
            touched = None
        edits = self.edits
        if is_container(old) and is_container(new) and _kind(old) == _kind(new):
            if isinstance(new, dict):
                if touched is not None and not touched.dropped:
                    self._diff_touched(old, new, prefix, touched)
                    return
                cv = self._dict_value(old, new, prefix)
                if cv is not None:
                    edits[prefix] = cv
                if len(new) < len(old) or new.keys() != old.keys():
                    for key in old.keys() - new.keys():
                        self.delete(old[key], prefix + enc_elem(key))
                missing = _MISSING
                for key, sub in new.items():
                    was = old.get(key, missing)
                    if was is sub:  # unchanged (the merge shared it): the common case, without a call
                        continue
                    if was is missing:
                        self._add(sub, prefix + enc_elem(key))
                    else:
                        self.diff(was, sub, prefix + enc_elem(key), touched.get(key) if touched else None)
            else:
                if container_value(new) != container_value(old):
                    edits[prefix] = container_value(new)
                for i, sub in enumerate(new):
                    if i < len(old):
                        if old[i] is not sub:
                            self.diff(old[i], sub, prefix + enc_elem(i))
                    else:
                        self._add(sub, prefix + enc_elem(i))
                for i in range(len(new), len(old)):
                    self.delete(old[i], prefix + enc_elem(i))
            return
        if not is_container(old) and not is_container(new) and _same_leaf(old, new):
            return
        self.delete(old, prefix)
        edits.update(items(new, self.blob_value, prefix))

    def _diff_touched(self, old: dict[Any, Any], new: dict[Any, Any], prefix: bytes, touched: Touched) -> None:
        """:meth:`diff` of two mappings where only ``touched``'s keys may differ and none was deleted."""
        edits = self.edits
        added: list[Any] = []
        gone = False
        for key, sub_touched in touched.items():
            was = old.get(key, _MISSING)
            sub = new.get(key, _MISSING)
            if was is sub:
                continue
            kp = prefix + enc_elem(key)
            if sub is _MISSING:
                gone = True  # not expected without ``dropped``: then the order is compared whole below
                self.delete(was, kp)
            elif was is _MISSING:
                added.append(key)
                if not self.lazy:
                    self._add(sub, kp)
            else:
                self.diff(was, sub, kp, sub_touched)
        if added and self.lazy:
            self._add_keys(old, new, prefix, added)
        if gone:
            cv = self._dict_value(old, new, prefix)
        elif not added and len(new) == len(old):
            hit = self.memo.get(prefix)
            if hit is not None and hit[0] is old:  # the same keys in the same order
                self.memo[prefix] = (new, hit[1])
            cv = None
        else:
            cv = self._dict_value(old, new, prefix, added)
        if cv is not None:
            edits[prefix] = cv

    def _add_keys(self, old: dict[Any, Any], new: dict[Any, Any], prefix: bytes, added: list[Any]) -> None:
        """The subtrees of ``new`` under ``added`` (keys ``old`` lacks), in a lazy diff. Keys that all sort
        after ``old``'s (ids that grow: a history's checkpoints) are one :class:`prolly.Insert` of their run
        (issue 20: an edit, its key and an Insert per new key were ~0.5 KB per checkpoint at the peak of a
        save after 30,000 puts, kept by pymalloc after it): no item of ``old`` sorts among them."""
        if len(added) > 1 and len(old) > 64 and self._in_key_order(old, prefix):
            run = sorted((enc_elem(k), k) for k in added)
            if run[0][0] > enc_elem(next(reversed(old))):
                self.edits[prefix + run[0][0]] = prolly.Insert((new, prefix, [k for _, k in run]), prefix + run[0][0],
                                                               self._expand_run)
                return
        for key in added:
            self._add(new[key], prefix + enc_elem(key))

    def delete(self, node: Any, prefix: bytes) -> None:
        _delete(node, prefix, self.edits, self.memo)


def _run_items(run: tuple[dict[Any, Any], bytes, list[Any]], blob_value: BlobValue) -> Iterator[tuple[bytes, bytes]]:
    """The items of a run of new keys of one mapping (see :meth:`Differ._add_keys`), in key order."""
    mapping, prefix, keys = run
    for key in keys:
        yield from items(mapping[key], blob_value, prefix + enc_elem(key))


def _sorted_after(old: dict[Any, Any], tail: list[Any]) -> bool:
    """Whether ``tail`` is in key order and after ``old``'s last key."""
    if not tail:
        return True
    encoded = [enc_elem(next(reversed(old)))] + [enc_elem(k) for k in tail]
    return all(a < b for a, b in itertools.pairwise(encoded))


def diff(old: Any, new: Any, blob_value: BlobValue, edits: dict[bytes, bytes | None]) -> None:
    """Put into ``edits`` what turns the items of ``old`` into those of ``new`` (``None``: delete)."""
    differ = Differ(blob_value)
    differ.diff(old, new)
    edits.update(cast(dict[bytes, bytes | None], differ.edits))  # not lazy: no Insert


_MISSING: Any = object()


def _delete(node: Any, prefix: bytes, edits: dict[bytes, prolly.Edit],
            memo: dict[bytes, tuple[Any, bool]] | None = None) -> None:
    edits[prefix] = None
    if type(node) is Packed:
        node = node.open()
    if is_container(node):
        if memo and isinstance(node, dict) and len(node) > 64:
            memo.pop(prefix, None)
        for key, sub in _children(node):
            _delete(sub, prefix + enc_elem(key), edits, memo)


def blobs_of(tree: Any) -> Iterator[Blob]:
    if type(tree) is Packed:
        tree = tree.open()
    if isinstance(tree, Blob):
        yield tree
    elif is_container(tree):
        for _key, sub in _children(tree):
            yield from blobs_of(sub)


def leaves_of(tree: Any) -> Iterator[Blob | Packed]:
    """The binary leaves of ``tree``, a :class:`Packed` subtree as itself, unopened: every leaf it holds is
    a small bytes leaf in memory (inline in a page, never a chunk to write), ``held`` bytes in all (one
    that holds no bytes is left out: it adds nothing a save counts)."""
    if isinstance(tree, Blob) or (type(tree) is Packed and tree.held):
        yield tree
    elif is_container(tree):
        for _key, sub in _children(tree):
            yield from leaves_of(sub)


def leaf_bytes(leaf: Blob | Packed) -> int:
    """The bytes of the binary leaves :func:`leaves_of` gave as ``leaf``."""
    return leaf.held if isinstance(leaf, Packed) else leaf.nbytes


def new_blobs(old: Any, new: Any, touched: Touched | None = None) -> Iterator[Blob | Packed]:
    """The binary leaves of ``new`` that ``old`` does not hold as the same object (what a save may have to
    write), as :func:`leaves_of` gives them; with ``touched`` (the paths that may differ, see
    :class:`Differ`) only those paths are visited."""
    if old is new:
        return
    if isinstance(new, dict) and isinstance(old, dict):
        if touched is not None:
            for key, sub_touched in touched.items():
                sub = new.get(key)
                was = old.get(key)
                if sub is not None and was is not sub:
                    yield from new_blobs(was, sub, sub_touched)
            return
        for key, sub in new.items():
            was = old.get(key)
            if was is not sub:
                yield from new_blobs(was, sub)
    elif isinstance(new, list | tuple) and isinstance(old, list | tuple):
        for i, sub in enumerate(new):
            yield from new_blobs(old[i] if i < len(old) else None, sub)
    else:
        yield from leaves_of(new)


def decode_value(raw: bytes, where: str) -> list[Any]:
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise CorruptVersion(f"{where}: unreadable state item ({exc})") from None
    if not isinstance(value, list) or not value or value[0] not in ("m", "l", "t", "s", "b", "B"):
        raise CorruptVersion(f"{where}: malformed state item")
    return value


def unflatten(entries: Iterator[tuple[bytes, bytes]], blob_of: Callable[[list[Any]], Blob], where: str,
              base: bytes = b"") -> Any:
    """The tree (or the subtree at key ``base``) from its items in key order. ``blob_of`` turns a
    ``"b"``/``"B"`` value into a :class:`Blob`."""
    root: list[Any] = []
    # The stack of open containers: (key prefix, container, pending order or None).
    stack: list[tuple[bytes, Any, list[Any] | None]] = []

    def close() -> None:
        key, node, order = stack.pop()
        if isinstance(node, dict) and order is not None:
            if sorted(order, key=enc_elem) != list(node):
                raise CorruptVersion(f"{where}: a mapping's key order does not match its keys")
            node = {k: node[k] for k in order}
        value: Any = tuple(node) if isinstance(node, _TupleBuilder) else node
        attach(key, value)

    def attach(key: bytes, value: Any) -> None:
        if not stack:
            if key != base or root:
                raise CorruptVersion(f"{where}: state items out of order")
            root.append(value)
            return
        pkey, parent, _ = stack[-1]
        try:
            (elem,) = dec_path(key[len(pkey):])
        except ValueError:
            raise CorruptVersion(f"{where}: a state item has no parent") from None
        if isinstance(parent, dict):
            parent[elem] = value
        else:
            if elem != len(parent):
                raise CorruptVersion(f"{where}: a list has a gap at {elem}")
            parent.append(value)

    try:
        for key, raw in entries:
            while stack and not _below(key, stack[-1][0]):
                close()
            value = decode_value(raw, where)
            tag = value[0]
            if tag in ("m", "l", "t"):
                order = value[1] if tag == "m" and len(value) > 1 else None
                stack.append((key, {} if tag == "m" else ([] if tag == "l" else _TupleBuilder()), order))
            elif tag == "s":
                attach(key, from_node(value[1], []))
            else:
                attach(key, blob_of(value))
        while stack:
            close()
    except CorruptVersion:
        raise
    except Exception as exc:
        raise CorruptVersion(f"{where}: unreadable state tree ({exc})") from None
    if not root:
        raise CorruptVersion(f"{where}: no state item at the path")
    return root[0]


def _below(key: bytes, prefix: bytes) -> bool:
    """Whether ``key`` is a descendant of the node at ``prefix`` (not a sibling like ``"a\\x00"`` of ``"a"``)."""
    return len(key) > len(prefix) and key.startswith(prefix) and key[len(prefix)] in (1, 2)


class _TupleBuilder(list[Any]):
    """A tuple being filled in (tuples are immutable)."""
