"""Deep-merge of deltas into a job's state, without ever mutating a tree a snapshot may hold.

``merge`` copies only the mappings along the paths a delta touches (path copying) and shares the rest,
so a merge costs O(size of the delta) and taking a snapshot of a job is just keeping a reference to its
current root. That is what makes an update atomic for free: the daemon applies a whole delta in one
step of its event loop, and a save works from the root it grabbed, which no later merge can change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .tree import DELETE, Blob, iter_blobs

State = dict[str | int, Any]


def merge(base: State, delta: Mapping[str | int, Any]) -> State:
    """Return ``base`` with ``delta`` deep-merged: mappings merge, other values replace, DELETE removes."""
    out = dict(base)
    for key, value in delta.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge({}, value)
        else:
            out[key] = value
    return out


def tree_bytes(tree: Any) -> int:
    """Bytes of all binary leaves of a tree (what a full save of it would write, before dedup)."""
    return sum(blob.nbytes for blob in iter_blobs(tree))


def delta_bytes(delta: Any, header_size: int) -> int:
    """What a delta adds to a job's unsaved bytes: its binary leaves plus its encoded structure."""
    return header_size + sum(b.nbytes for b in iter_blobs(delta) if isinstance(b, Blob))
