"""A prolly tree: a sorted map of byte keys to byte values, stored as content-addressed pages.

Why this structure (format 2, issue 20). A version must cost what changed, not what is stored, and two
equal states must be equal bytes, so pages dedup across versions and across a job's history:

- *Content-addressed pages* (named by the BLAKE3 of their bytes, stored as objects like data chunks):
  a save writes only pages that do not exist yet; a page shared by a hundred versions is stored once.
- *Boundaries chosen by hashing keys* (as Dolt's prolly trees, and unlike a B-tree whose splits depend
  on insertion order): whether an item ends a page depends on a hash of its key and on the bytes the page
  holds so far, never on the history of edits. So the same map always gives the same pages and the same
  root (history independence), which a B-tree cannot promise. A value that changes size inside the
  bounds never moves a boundary: only the page holding it is rewritten, plus its ancestors.
- *Bounds*: a page is cut at a natural (key-hash) boundary only once it holds ``min_bytes``, and always
  once it holds ``max_bytes``. With roughly ``1/q`` of keys being natural boundaries a page lands around
  ``min_bytes + q * item`` bytes. The minimum stops tiny pages (one object per few keys would cost a
  file and a request each); the maximum bounds a page whatever the keys hash to.
- *Edits re-chunk locally*: the chunker's decision depends only on the items since the last cut, so
  an edit re-chunks from the start of the page it falls in until a new cut lands where an old page ended
  after the last edit; from there the old pages are the new pages. An update of ``k`` keys reads and
  writes O(k) leaf pages and the O(k log N) interior pages above them. The same holds one level up: an
  interior level is the sequence of the refs below, cut by the same rule, so :func:`edit` re-chunks each
  level only around the refs that changed below, taking an old page's children from the level below held
  in memory (:class:`Levels`), and no interior page is read.

Interior pages hold, per child, its first key, its digest and its item count; a lookup descends to the
last child whose first key is <= the key. Ranges (a subtree of the state: every key with one prefix)
read only the pages that overlap the range. Compared with OCDBT (TensorStore) this has no manifest of
versions inside the tree and no version-keyed nodes: a version here is a small root record beside it
(see :mod:`.manifest`), and the tree is only the state at that version.

This module is pure: pages are bytes handed to ``put`` / read back with ``get``; the store does I/O.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import blake3
import msgpack

from ..errors import CorruptVersion
from ..tree import Walked

PAGE_FORMAT: Final = 1
PAGE_HASH: Final = "blake3"  # names pages (a root record says so, so another could come later)


@dataclass(frozen=True)
class Params:
    """Chunking parameters: part of a version's root record, since other values give other pages."""

    min_bytes: int = 4096
    max_bytes: int = 16384
    q_leaf: int = 16  # about one key in q is a natural boundary of a leaf page
    q_node: int = 64  # ... of an interior page (its items are small: a key and a digest)

    def to_json(self) -> dict[str, int]:
        return {"min_bytes": self.min_bytes, "max_bytes": self.max_bytes, "q_leaf": self.q_leaf,
                "q_node": self.q_node}

    @classmethod
    def from_json(cls, raw: Any) -> Params:
        if not isinstance(raw, dict):
            raise ValueError("page parameters must be a map")
        values = {k: raw.get(k) for k in ("min_bytes", "max_bytes", "q_leaf", "q_node")}
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values.values()):
            raise ValueError(f"bad page parameters {raw!r}")
        return cls(**values)  # type: ignore[arg-type]


DEFAULT_PARAMS: Final = Params()


@dataclass(frozen=True)
class Ref:
    """A page as its parent names it."""

    first: bytes  # the page's first key (b"" for an empty tree's only page)
    digest: str  # hex BLAKE3 of the page's bytes: its object name
    count: int  # items below it (leaf items)


Get = Callable[[str], bytes]
Put = Callable[[str, bytes], None]


class Insert:
    """An edit that inserts a run of sorted items where no item was, the first at the edit's own key and
    every other under it (a save's new subtree), made only when the chunker reaches it (issue 20: a save
    after 90,000 new checkpoints held every new item, its key and its value, in memory at once before
    the first page was cut; an RSS peak that glibc and pymalloc then kept). ``expand(source, key)``
    gives the items; every key it gives must sort before the next edit's key and after the item before."""

    __slots__ = ("expand", "key", "source")

    def __init__(self, source: Any, key: bytes, expand: Callable[[Any, bytes], Iterator[tuple[bytes, bytes]]]) -> None:
        self.source, self.key, self.expand = source, key, expand

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        return self.expand(self.source, self.key)


# What an edit sets a key to: a value, ``None`` (delete), or an :class:`Insert` of a run of new items.
Edit = bytes | None | Insert


def pack(value: Any) -> bytes:
    out: bytes = msgpack.packb(value, use_bin_type=True)
    return out


def page_digest(raw: bytes) -> str:
    return blake3.blake3(raw).hexdigest()


def _is_boundary(key: bytes, level: int, q: int) -> bool:
    h = hashlib.blake2b(key, digest_size=4, person=b"prolly" + bytes([level])).digest()
    return int.from_bytes(h, "big") % q == 0


def encode_leaf(items: list[tuple[bytes, bytes]]) -> bytes:
    return pack([PAGE_FORMAT, 0, [[k, v] for k, v in items]])


def encode_node(level: int, refs: list[Ref]) -> bytes:
    return pack([PAGE_FORMAT, level, [[r.first, bytes.fromhex(r.digest), r.count] for r in refs]])


@dataclass(frozen=True)
class Page:
    level: int
    items: list[tuple[bytes, bytes]]  # level 0
    refs: list[Ref]  # level > 0


def decode_page(raw: bytes, digest: str, where: str) -> Page:
    """An untrusted page, already checked against ``digest`` by the caller; malformed is CorruptVersion."""
    try:
        fmt, level, body = msgpack.unpackb(raw, raw=False, strict_map_key=False)
        if fmt != PAGE_FORMAT or not isinstance(level, int) or not isinstance(body, list):
            raise ValueError("bad page header")
        if level == 0:
            items = [(bytes(k), bytes(v)) for k, v in body]
            if not all(isinstance(k, bytes) for k, _ in items):
                raise ValueError("bad key")
            return Page(0, items, [])
        refs = [Ref(bytes(f), bytes(d).hex(), int(c)) for f, d, c in body]
        if not refs or any(len(r.digest) != 64 for r in refs):
            raise ValueError("bad interior page")
        return Page(level, [], refs)
    except Exception as exc:
        raise CorruptVersion(f"{where}: page {digest[:16]}… is malformed ({exc})") from None


class _Chunker:
    """Cuts one level's item sequence into pages; emits each page through ``put`` as it is cut."""

    def __init__(self, level: int, params: Params, put: Put) -> None:
        self.level = level
        self.params = params
        self.q = params.q_leaf if level == 0 else params.q_node
        self.put = put
        self.items: list[Any] = []
        self.size = 0
        self.out: list[Ref] = []

    def add(self, key: bytes, item: Any, nbytes: int) -> None:
        self.items.append(item)
        self.size += nbytes
        if self.size >= self.params.max_bytes or (
                self.size >= self.params.min_bytes and _is_boundary(key, self.level, self.q)):
            self.cut()

    @property
    def empty(self) -> bool:
        return not self.items

    def cut(self) -> None:
        if self.level == 0:
            raw = encode_leaf(self.items)
            first, count = (self.items[0][0] if self.items else b""), len(self.items)
        else:
            raw = encode_node(self.level, self.items)
            first, count = self.items[0].first, sum(r.count for r in self.items)
        digest = page_digest(raw)
        self.put(digest, raw)
        self.out.append(Ref(first, digest, count))
        Walked.entries += len(self.items)
        if Walked.entries >= Walked.step_at:  # a yield point of a save (daemon/loopfirst.py)
            Walked.step()
        self.items, self.size = [], 0


def _item_size(key: bytes, value: bytes) -> int:
    return len(key) + len(value) + 4


def _ref_size(ref: Ref) -> int:
    return len(ref.first) + 40


def chunk_leaves(items: Iterable[tuple[bytes, bytes]], params: Params, put: Put) -> list[Ref]:
    """Cut sorted items into leaf pages; a map with no items is one empty page."""
    ch = _Chunker(0, params, put)
    for key, value in items:
        ch.add(key, (key, value), _item_size(key, value))
    if not ch.empty or not ch.out:
        ch.cut()
    return ch.out


def build_levels(leaves: list[Ref], params: Params, put: Put) -> tuple[str, int]:
    """The interior levels over ``leaves``: (root digest, height); height 0 is a lone leaf page."""
    levels = Levels.build(leaves, params, put)
    return levels.root, levels.height


def build(items: Iterable[tuple[bytes, bytes]], params: Params, put: Put) -> tuple[str, list[Ref]]:
    """A whole tree from sorted, distinct items: (root digest, leaf refs)."""
    leaves = chunk_leaves(items, params, put)
    root, _height = build_levels(leaves, params, put)
    return root, leaves


def load_page(get: Get, digest: str, where: str) -> Page:
    return decode_page(get(digest), digest, where)


def iterate(root: str, get: Get, where: str, lo: bytes = b"", hi: bytes | None = None
            ) -> Iterator[tuple[bytes, bytes]]:
    """Items with ``lo <= key < hi`` in key order, reading only the pages that overlap that range."""
    page = load_page(get, root, where)
    if page.level == 0:
        for key, value in page.items:
            if key >= lo and (hi is None or key < hi):
                yield key, value
        return
    firsts = [r.first for r in page.refs]
    start = max(0, bisect.bisect_right(firsts, lo) - 1)
    for i in range(start, len(page.refs)):
        if hi is not None and page.refs[i].first >= hi and i > start:
            break
        yield from iterate(page.refs[i].digest, get, where, lo, hi)


def walk_pages(root: str, get: Get, where: str, skip: Callable[[str], bool]) -> Iterator[tuple[str, Page]]:
    """Every page reachable from ``root`` (parents first), not descending below a page ``skip`` says was
    seen already (the marking of garbage collection: shared subtrees are walked once)."""
    if skip(root):
        return
    page = load_page(get, root, where)
    yield root, page
    for ref in page.refs:
        yield from walk_pages(ref.digest, get, where, skip)


Splice = tuple[int, int, list[Ref]]  # refs [lo, hi) of a level's old list are replaced by these


def apply(leaves: list[Ref], edits: Mapping[bytes, Edit], params: Params, get: Get, put: Put,
          where: str) -> list[Ref]:
    """The leaf refs after setting (value) or deleting (``None``) ``edits``' keys (see :func:`leaf_splices`)."""
    return _spliced(leaves, leaf_splices(leaves, [r.first for r in leaves], edits, params, get, put, where))


def leaf_splices(leaves: list[Ref], firsts: list[bytes], edits: Mapping[bytes, Edit], params: Params,
                 get: Get, put: Put, where: str) -> list[Splice]:
    """How the leaf refs change when ``edits``' keys are set (value) or deleted (``None``): sorted,
    disjoint ranges of ``leaves`` and the refs that replace them (``firsts``: the leaves' first keys).

    Reads the leaf pages the edits fall in, and re-chunks from the start of each until a new cut meets
    an old page end past the last edit in reach (see the module docstring); every other leaf ref is
    reused as it is. New pages go to ``put``."""
    if not edits:
        return []
    keys = sorted(edits)

    def leaf_of(key: bytes) -> int:
        return max(0, bisect.bisect_right(firsts, key) - 1)

    out: list[Splice] = []
    i = e = 0
    n = len(leaves)
    gone = 0  # leaf refs the splices so far removed, net
    while i < n and e < len(keys):
        i = max(i, leaf_of(keys[e]))
        start = i
        ch = _Chunker(0, params, put)
        while True:
            hi = firsts[i + 1] if i + 1 < n else None
            mine: list[bytes] = []
            while e < len(keys) and (hi is None or keys[e] < hi):
                mine.append(keys[e])
                e += 1
            for key, value in _merged(load_page(get, leaves[i].digest, where).items, mine, edits):
                ch.add(key, (key, value), _item_size(key, value))
            i += 1
            if i == n:
                if not ch.empty or not (start - gone or ch.out):  # an empty map is one empty page
                    ch.cut()
                break
            if ch.empty and (e == len(keys) or leaf_of(keys[e]) >= i):
                break
        out.append((start, i, ch.out))
        gone += i - start - len(ch.out)
    return out


def _spliced(old: list[Any], splices: list[Splice], key: Callable[[Ref], Any] | None = None) -> list[Any]:
    """``old`` with the splices made (of ``key`` of each new ref, when given): copies of the untouched
    runs, at memcpy speed, and no Python-level work per untouched item."""
    out: list[Any] = []
    pos = 0
    for lo, hi, refs in splices:
        out += old[pos:lo]
        out += refs if key is None else [key(r) for r in refs]
        pos = hi
    out += old[pos:]
    return out


def _level_splices(level: int, children: list[Ref], child_firsts: list[bytes], pages: list[Ref],
                   page_firsts: list[bytes], below: list[Splice], params: Params, put: Put) -> list[Splice]:
    """How an interior level's refs change when the level below changes by ``below``: the re-chunking of
    :func:`leaf_splices` one level up, its pages' children taken from the old list below (no page read).
    Starts at the old page that holds a splice's first child; stops where a cut meets an old page's end
    with no splice left in reach."""
    n, npages = len(children), len(pages)

    def start(p: int) -> int:  # where page p's children start in the old list below
        return 0 if p == 0 else bisect.bisect_left(child_firsts, page_firsts[p])

    def page_of(child: int) -> int:
        lo, hi = 0, npages - 1  # the last page whose start is <= child
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if start(mid) <= child:
                lo = mid
            else:
                hi = mid - 1
        return lo

    out: list[Splice] = []
    k = 0
    last = -1  # the old pages before this one are done
    while k < len(below):
        p = max(last + 1, page_of(below[k][0]))
        j = start(p)
        q = p + 1  # the next old page whose start is ahead
        next_start = start(q) if q < npages else n
        ch = _Chunker(level, params, put)
        while True:
            if k < len(below) and below[k][0] == j:
                for ref in below[k][2]:
                    ch.add(ref.first, ref, _ref_size(ref))
                j = below[k][1]
                k += 1
            elif j < n:
                ref = children[j]
                ch.add(ref.first, ref, _ref_size(ref))
                j += 1
            else:
                if not ch.empty:
                    ch.cut()
                q = npages
                break
            while q < npages and next_start < j:
                q += 1
                next_start = start(q) if q < npages else n
            if q < npages and j == next_start and ch.empty and (k == len(below) or below[k][0] >= j):
                break  # in step with the old pages again
        out.append((p, q, ch.out))
        last = q - 1
    return out


@dataclass(frozen=True)
class Levels:
    """A tree's page refs, level by level (``refs[0]``: the leaves; the last level: the root alone), with
    each level's first keys: what a save keeps in memory to edit the tree without reading interior pages."""

    refs: list[list[Ref]]
    firsts: list[list[bytes]]

    @property
    def root(self) -> str:
        return self.refs[-1][0].digest

    @property
    def height(self) -> int:
        return len(self.refs) - 1

    @property
    def leaves(self) -> list[Ref]:
        return self.refs[0]

    @classmethod
    def build(cls, leaves: list[Ref], params: Params, put: Put) -> Levels:
        """The interior levels over ``leaves``, built whole."""
        refs, level = [leaves], 0
        while len(refs[-1]) > 1:
            level += 1
            refs.append(_chunk_refs(level, refs[-1], params, put))
        return cls(refs, [[r.first for r in lv] for lv in refs])


def _chunk_refs(level: int, refs: list[Ref], params: Params, put: Put) -> list[Ref]:
    ch = _Chunker(level, params, put)
    for ref in refs:
        ch.add(ref.first, ref, _ref_size(ref))
    if not ch.empty:
        ch.cut()
    return ch.out


def edit(tree: Levels, edits: Mapping[bytes, Edit], params: Params, get: Get, put: Put,
         where: str) -> Levels:
    """The tree after setting (value) or deleting (``None``) ``edits``' keys, as :func:`build` would make
    it from the resulting items (history independence), writing only the pages that differ: the leaf
    pages around the edits and, per level, the interior pages around the changed refs below. ``tree`` is
    left as it was (a save that fails keeps the old one)."""
    splices = leaf_splices(tree.refs[0], tree.firsts[0], edits, params, get, put, where)
    refs: list[list[Ref]] = []
    firsts: list[list[bytes]] = []
    level = 0
    while True:
        if not splices:  # nothing changed from here up
            refs += tree.refs[level:]
            firsts += tree.firsts[level:]
            break
        new = _spliced(tree.refs[level], splices)
        refs.append(new)
        firsts.append(_spliced(tree.firsts[level], splices, key=_first))
        if len(new) == 1:  # the root (the tree may have lost levels)
            break
        if level + 1 >= len(tree.refs):  # the tree grew a level: build it (and any above) whole
            while len(refs[-1]) > 1:
                refs.append(_chunk_refs(len(refs), refs[-1], params, put))
                firsts.append([r.first for r in refs[-1]])
            break
        splices = _level_splices(level + 1, tree.refs[level], tree.firsts[level], tree.refs[level + 1],
                                 tree.firsts[level + 1], splices, params, put)
        level += 1
    return Levels(refs, firsts)


def _first(ref: Ref) -> bytes:
    return ref.first


def load_levels(root: str, get: Get, where: str) -> Levels:
    """A stored tree's :class:`Levels`, reading only its interior pages."""
    page = load_page(get, root, where)
    if page.level == 0:
        refs = [[Ref(page.items[0][0] if page.items else b"", root, len(page.items))]]
    else:
        count = sum(r.count for r in page.refs)
        refs = [[Ref(page.refs[0].first, root, count)]]
        pages = [page]
        for _ in range(page.level):
            below = [r for p in pages for r in p.refs]
            refs.insert(0, below)
            if pages[0].level == 1:
                break
            pages = [load_page(get, r.digest, where) for r in below]
    return Levels(refs, [[r.first for r in lv] for lv in refs])


def _merged(items: list[tuple[bytes, bytes]], keys: list[bytes], edits: Mapping[bytes, Edit]
            ) -> Iterator[tuple[bytes, bytes]]:
    """``items`` with the sorted ``keys`` set or deleted as ``edits`` says (an :class:`Insert` expanded)."""
    k = 0
    for key, value in items:
        while k < len(keys) and keys[k] < key:
            new = edits[keys[k]]
            if isinstance(new, Insert):
                yield from new.items()
            elif new is not None:
                yield keys[k], new
            k += 1
        if k < len(keys) and keys[k] == key:
            new = edits[key]
            if isinstance(new, Insert):
                raise AssertionError(f"an insert at {key!r}, where an item is")
            if new is not None:
                yield key, new
            k += 1
        else:
            yield key, value
    for key in keys[k:]:
        new = edits[key]
        if isinstance(new, Insert):
            yield from new.items()
        elif new is not None:
            yield key, new
