"""Subtrees of a format-2 version by path, as the daemon's live restore gives them (issue 20).

The daemon serves ``restore(path=...)`` of a job whose tree the state cache evicted from the job's newest
version (which holds exactly its state) instead of loading the whole tree back: only the pages on each
path and the leaves below it are read. The answer must be the one a restore of the live tree gives
(``daemon/rpcrestore.py``'s ``_subtree``): ``None`` where a key is missing or a step is not a mapping.
In the pages a list index and an int key encode alike, so every ancestor on the path is looked up too
(one item each, O(log N) pages) and must be a mapping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import NotFound
from . import paged, prolly
from . import statepages as sp
from .local import JobStore

# The smallest key after a node's own key and before its first child's (children add \x01 or \x02).
_JUST_AFTER = b"\x01"


def subtrees(store: JobStore, version: int, paths: Sequence[tuple[str | int, ...]]) -> list[Any] | None:
    """Each path's subtree of version ``version``, its chunked leaves not read (``data`` None, as a stored
    restore sends them); ``None`` when the version is not format 2 (the caller loads it whole)."""
    where = f"{store.job} version {version}"
    doc = store.read_manifest(version)
    if doc.get("format") != paged.FORMAT:
        return None
    root, _params = paged.check_root(doc, where)
    return [_subtree(store, doc, root, where, tuple(path)) for path in paths]


def _subtree(store: JobStore, doc: dict[str, Any], root: str, where: str, path: tuple[str | int, ...]) -> Any:
    for depth in range(len(path)):
        key = sp.enc_path(path[:depth])
        item = next(prolly.iterate(root, store.read_page, where, key, key + _JUST_AFTER), None)
        if item is None or item[0] != key or sp.decode_value(item[1], where)[0] != "m":
            return None
    try:
        return store.reader.tree(doc, where, path)[0]
    except NotFound:
        return None
