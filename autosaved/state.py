"""Deep-merge of deltas into a job's state, without ever mutating a tree a snapshot may hold.

``merge`` copies only the mappings along the paths a delta touches (path copying) and shares the rest,
so a merge costs O(size of the delta) and taking a snapshot of a job is just keeping a reference to its
current root. That is what makes an update atomic for free: the daemon applies a whole delta in one
step of its event loop, and a save works from the root it grabbed, which no later merge can change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .tree import DELETE, PLAIN_TYPES, Replace

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
