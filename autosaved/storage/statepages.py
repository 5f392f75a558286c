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
objects and are skipped without a look inside. The work is O(the width of the mappings on changed paths).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, Final

import msgpack

from ..errors import CorruptVersion
from ..tree import Blob, from_node, to_node

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
    """One save's diff: the edits, and which big mappings are in key order (by identity, holding them:
    the old side's are in the cached tree; what it learns of the new side's is kept for the next save)."""

    def __init__(self, blob_value: BlobValue, known: dict[int, tuple[Any, bool]] | None = None) -> None:
        self.blob_value = blob_value
        self.edits: dict[bytes, bytes | None] = {}
        self.known = known or {}
        self.learned: dict[int, tuple[Any, bool]] = {}

    def _in_key_order(self, mapping: dict[Any, Any]) -> bool:
        hit = self.known.get(id(mapping))
        if hit is not None and hit[0] is mapping:
            return hit[1]
        result = list(mapping) == _sorted_keys(mapping)
        self.known[id(mapping)] = (mapping, result)
        return result

    def _dict_value(self, old: dict[Any, Any], new: dict[Any, Any]) -> bytes | None:
        """``new``'s container value when it differs from ``old``'s, else ``None``. The common case costs
        O(the keys added): ``new`` is ``old`` with keys appended (what a merge makes), ``old`` was in key
        order, and the appended keys sort after the rest (ids that grow, like a history's)."""
        if len(old) > 64:
            added = new.keys() - old.keys()
            keys = list(new)
            if (len(new) == len(old) + len(added) and keys[: len(old)] == list(old)
                    and self._in_key_order(old) and _sorted_after(old, keys[len(old):])):
                self.learned[id(new)] = (new, True)
                return None  # ["m"] before and after
        value = container_value(new)
        if len(new) > 64:
            self.learned[id(new)] = (new, value == _IN_ORDER)
        return None if value == container_value(old) else value

    def diff(self, old: Any, new: Any, prefix: bytes = b"") -> None:
        """Put into ``edits`` what turns the items of ``old`` into those of ``new`` (``None``: delete)."""
        if old is new:
            return
        edits = self.edits
        if is_container(old) and is_container(new) and _kind(old) == _kind(new):
            if isinstance(new, dict):
                cv = self._dict_value(old, new)
                if cv is not None:
                    edits[prefix] = cv
                if len(new) < len(old) or new.keys() != old.keys():
                    for key in old.keys() - new.keys():
                        _delete(old[key], prefix + enc_elem(key), edits)
                missing = _MISSING
                known, learned = self.known, self.learned
                for key, sub in new.items():
                    was = old.get(key, missing)
                    if was is sub:  # unchanged (the merge shared it): the common case, without a call
                        if isinstance(sub, dict) and id(sub) in known:
                            learned[id(sub)] = known[id(sub)]
                        continue
                    if was is missing:
                        edits.update(items(sub, self.blob_value, prefix + enc_elem(key)))
                    else:
                        self.diff(was, sub, prefix + enc_elem(key))
            else:
                if container_value(new) != container_value(old):
                    edits[prefix] = container_value(new)
                for i, sub in enumerate(new):
                    if i < len(old):
                        if old[i] is not sub:
                            self.diff(old[i], sub, prefix + enc_elem(i))
                    else:
                        edits.update(items(sub, self.blob_value, prefix + enc_elem(i)))
                for i in range(len(new), len(old)):
                    _delete(old[i], prefix + enc_elem(i), edits)
            return
        if not is_container(old) and not is_container(new) and _same_leaf(old, new):
            return
        _delete(old, prefix, edits)
        edits.update(items(new, self.blob_value, prefix))


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
    edits.update(differ.edits)


_MISSING: Any = object()


def _delete(node: Any, prefix: bytes, edits: dict[bytes, bytes | None]) -> None:
    edits[prefix] = None
    if is_container(node):
        for key, sub in _children(node):
            _delete(sub, prefix + enc_elem(key), edits)


def blobs_of(tree: Any) -> Iterator[Blob]:
    if isinstance(tree, Blob):
        yield tree
    elif is_container(tree):
        for _key, sub in _children(tree):
            yield from blobs_of(sub)


def new_blobs(old: Any, new: Any) -> Iterator[Blob]:
    """The blobs of ``new`` that ``old`` does not hold as the same object (what a save may have to write)."""
    if old is new:
        return
    if isinstance(new, dict) and isinstance(old, dict):
        for key, sub in new.items():
            was = old.get(key)
            if was is not sub:
                yield from new_blobs(was, sub)
    elif isinstance(new, list | tuple) and isinstance(old, list | tuple):
        for i, sub in enumerate(new):
            yield from new_blobs(old[i] if i < len(old) else None, sub)
    else:
        yield from blobs_of(new)


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
