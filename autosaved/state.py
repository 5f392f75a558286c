"""Deep-merge of deltas into a job's state, without ever mutating a tree a snapshot may hold.

``merge`` copies only the mappings along the paths a delta touches (path copying) and shares the rest,
so a merge costs O(size of the delta) and taking a snapshot of a job is just keeping a reference to its
current root. That is what makes an update atomic for free: the daemon applies a whole delta in one
step of its event loop, and a save works from the root it grabbed, which no later merge can change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .tree import DELETE, PLAIN_TYPES, Blob, Replace, iter_blobs

State = dict[str | int, Any]


def merge(base: State, delta: Mapping[str | int, Any]) -> State:
    """Return ``base`` with ``delta`` deep-merged: mappings merge, other values replace, DELETE removes,
    a :class:`Replace` sets a mapping wholesale."""
    out = dict(base)
    for key, value in delta.items():
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
    out = dict(first)
    for key, value in second.items():
        if type(value) in PLAIN_TYPES:
            out[key] = value
            continue
        before = out.get(key, _MISSING)
        if value is DELETE or isinstance(value, Replace) or not isinstance(value, Mapping) or before is _MISSING:
            out[key] = value
        elif isinstance(before, Replace):
            out[key] = Replace(merge(before.mapping, value))
        elif isinstance(before, Mapping):
            out[key] = merge_deltas(before, value)
        else:  # DELETE or a plain value came first
            out[key] = Replace(merge({}, value))
    return out


_MISSING: Any = object()

# Binary leaves up to this size are compared byte for byte when resent; larger ones count as changed (a
# compare of a large tensor would hold the event loop for about a millisecond per MiB, and a resent large
# tensor costs a version but no disk: its chunks dedup).
COMPARE_BLOB_BYTES = 1 << 20


def changes_anything(base: State, delta: Mapping[str | int, Any]) -> bool:
    """Whether merging ``delta`` into ``base`` would change it (issue 22: resending ``{"a": 1}`` or
    deleting a missing key must not make a version). O(the delta)."""
    for key, value in delta.items():
        before = base.get(key, _MISSING)
        if value is DELETE:
            if before is not _MISSING:
                return True
        elif type(value) in PLAIN_TYPES:
            # ``1 == True == 1.0`` but they are different leaves; NaN != NaN counts as a change.
            if type(before) is not type(value) or before != value:
                return True
        elif isinstance(value, Replace) or before is _MISSING:
            return True
        elif isinstance(value, Mapping):
            if not isinstance(before, dict) or changes_anything(before, value):
                return True
        elif not _same_leaf(before, value):
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


def tree_bytes(tree: Any) -> int:
    """Bytes of all binary leaves of a tree (what a full save of it would write, before dedup)."""
    return sum(blob.nbytes for blob in iter_blobs(tree))


def delta_bytes(delta: Any, header_size: int) -> int:
    """What a delta adds to a job's unsaved bytes: its binary leaves plus its encoded structure."""
    return header_size + sum(b.nbytes for b in iter_blobs(delta) if isinstance(b, Blob))
