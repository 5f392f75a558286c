"""After the daemon loads a job's state from a format-2 version, what the next save diffs against.

A format-2 save costs the change only when the store remembers the tree it last wrote (``paged.Cache``);
a job loaded from disk (at start, or back after the state cache evicted it) would otherwise re-encode
and re-hash its whole state at its next save. :func:`warm` sets that memory from the version the state
was loaded from: the tree the daemon now holds (the same objects, so unchanged subtrees diff by
identity) and the version's page refs, level by level (read from its interior pages, a few).
"""

from __future__ import annotations

from typing import Any

from . import paged, prolly
from .local import JobStore


def warm(store: JobStore, version: int, tree: Any) -> None:
    """Remember ``tree`` (the daemon's copy of version ``version``, exactly) as the store's last written
    tree. A format-1 version, or one with other page parameters, leaves the store as it is."""
    where = f"{store.job} version {version}"
    doc = store.read_manifest(version)
    if doc.get("format") != paged.FORMAT:
        return
    root, params = paged.check_root(doc, where)
    if params != prolly.DEFAULT_PARAMS:
        return
    levels = prolly.load_levels(root, store.read_page, where)
    store.paged_cache = paged.Cache(version, tree, levels, params, int(doc.get("bytes", 0)))
