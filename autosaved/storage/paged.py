"""Format 2 of the local store: a version is a small root record over a prolly tree of pages.

The root record is ``versions/<id>.json`` as in format 1 (sealed JSON, its commit is the version's
existence), but instead of the whole state it names the root page of a :mod:`.prolly` tree whose items
are the state's nodes (:mod:`.statepages`), plus the page parameters, the parent version and the usual
step, meta, sessions and covered log position. Pages are objects in ``objects/<ab>/<digest>`` beside the
data chunks, named by the BLAKE3 of their bytes and verified on every read.

A save diffs the tree it is given against the tree of the job's last save (kept in memory, see
:class:`Cache`), on the paths the daemon says changed when it knows them (:data:`Changed`), writes the
new data chunks, re-chunks only the leaf pages the diff touches and the interior pages around them
(:func:`.prolly.edit`), so it writes and computes O(changed leaves x log N). The crash-safety
argument is format 1's: every page and chunk is durable under its final name (pipeline: write, fsync,
rename; then the directories' fsync) before the root record that names it is committed.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from ..errors import CorruptVersion, NotFound
from ..tree import Blob
from . import fileops, hashing, prolly
from . import statepages as sp
from .chunkwriter import ChunkPipeline, fsync_dirs
from .fsutil import Pacer, atomic_write, temp_name
from .manifest import HASH_NAME, VersionInfo, blob_from_record, blob_record, seal, utc_now_iso

if TYPE_CHECKING:
    from ..state import Touched
    from .local import JobStore, SaveResult

FORMAT: Final = 2


KeyOrder = dict[bytes, tuple[Any, bool]]  # see statepages.Differ


@dataclass
class Cache:
    """What a job's last save (or load) left in memory so the next save costs only the change: the tree
    it wrote (the daemon never mutates a tree, so unchanged subtrees stay the same objects) and the page
    refs of every level of its pages (:class:`.prolly.Levels`: an edit re-chunks the pages around the
    changes and reads no interior page)."""

    version: int
    tree: Any
    levels: prolly.Levels
    params: prolly.Params
    bytes: int
    # Big mappings of ``tree`` known to be in key order or not, by path: see statepages.Differ.
    in_key_order: KeyOrder = field(default_factory=dict)


# What a save passes on about its tree: (the version whose tree the paths are relative to, the paths the
# daemon's merges changed since; see autosaved.state.Touched). ``None``: unknown, the diff visits all.
Changed = tuple[int, "Touched"]


def _blob_value(records: dict[int, dict[str, Any]]) -> sp.BlobValue:
    def value(blob: Blob) -> bytes:
        rec = records.get(id(blob))
        if rec is None and blob.data is not None and blob.nbytes <= sp.INLINE_MAX:
            return sp.pack(["B", blob.descriptor(), bytes(blob.data)])
        if rec is None:
            assert blob.chunks is not None, "a stored leaf without chunks"
            rec = blob_record(blob, blob.chunks)
        return sp.pack(["b", rec])

    return value


def _inline(blob: Blob) -> bool:
    return blob.data is not None and blob.nbytes <= sp.INLINE_MAX


def write_version(store: JobStore, tree: Any, version: int, step: int | None, reason: str, meta: dict[str, Any],
                  sessions: dict[str, int], chunk_size: int, pace: Pacer | None, wal_lsn: int,
                  compression: str, changed: Changed | None = None) -> SaveResult:
    from .local import SaveResult, submit_digests

    store.ensure_dirs()
    params = prolly.DEFAULT_PARAMS
    cache = store.paged_cache
    if cache is not None and (cache.params != params or not store.has_version(cache.version)):
        cache = None  # another page layout, or the version it described is gone: start from the store
    old_tree = cache.tree if cache is not None else None
    # The daemon's changed paths hold only relative to the tree the cache holds.
    touched = changed[1] if changed is not None and cache is not None and changed[0] == cache.version else None
    # Packed subtrees come unopened: their leaves are all inline (autosaved.state, PACK_WIDTH).
    added = list(sp.new_blobs(old_tree, tree, touched) if cache is not None else sp.leaves_of(tree))
    to_store = [b for b in added if type(b) is Blob and not _inline(b)]
    ahead = {id(b): submit_digests(b.data, chunk_size) for b in to_store
             if b.data is not None and chunk_size not in b.digests and not _shared(b)}
    records: list[dict[str, Any]] = []
    counts = [0, 0]
    dirs_touched: set[Path] = set()
    pipeline = ChunkPipeline(pace)
    queued: set[str] = set()
    pages = [0, 0]  # bytes, pages written
    where = f"{store.job} version {version}"
    # What each page this save writes references, for gc's marking of this version (gcmark.LiveSet reads a
    # page only when it has no entry): the last save's only, so the memo stays one save's size.
    links = store.fresh_links = {}

    def put(digest: str, raw: bytes) -> None:
        if digest in queued:
            return
        dirs_touched.add(store.object_path(digest).parent)
        if store.has_object(digest):
            return
        target = store.object_path(digest)
        fileops.mkdir(target.parent, 0o750, exist_ok=True)
        pages[0] += pipeline.put(temp_name(store.tmp_dir, digest), target, raw, kind="page")
        pages[1] += 1
        queued.add(digest)
        links[digest] = fresh_links(raw, digest, where)

    try:
        store.write_chunks(to_store, ahead, chunk_size, compression, pipeline, records, dirs_touched, counts)
        blob_value = _blob_value({id(b): rec for b, rec in zip(to_store, records, strict=True)})
        memo: dict[bytes, tuple[Any, bool]] = {}
        if cache is None:
            levels = prolly.Levels.build(prolly.chunk_leaves(sp.items(tree, blob_value), params, put), params, put)
            total = sum(sp.leaf_bytes(b) for b in added)
        else:
            differ = sp.Differ(blob_value, dict(cache.in_key_order), lazy=True)
            differ.diff(cache.tree, tree, touched=touched)
            memo = differ.memo
            levels = prolly.edit(cache.levels, differ.edits, params, store.read_page, put, where)
            removed = sp.new_blobs(tree, old_tree, touched)
            total = cache.bytes + sum(sp.leaf_bytes(b) for b in added) - sum(sp.leaf_bytes(b) for b in removed)
        root, height = levels.root, levels.height
        pipeline.finish()
    except BaseException:
        pipeline.abandon()
        raise
    dirs_touched.add(store.objects_dir)
    fsync_dirs(dirs_touched)

    info = VersionInfo(job=store.job, id=version, step=step, time=utc_now_iso(), bytes=total, reason=reason,
                       meta=meta)
    body = {
        "format": FORMAT, "hash": HASH_NAME, "job": store.job, "version": version, "step": step,
        "time": info.time, "reason": reason, "meta": meta, "bytes": total, "sessions": sessions,
        "wal_lsn": wal_lsn, "parent": cache.version if cache is not None else None,
        "pages": {**params.to_json(), "hash": prolly.PAGE_HASH}, "root": root, "height": height,
    }
    manifest = seal(body)
    atomic_write(store.versions_dir / f"{version:012d}.json", manifest, store.tmp_dir)
    store.paged_cache = Cache(version, tree, levels, params, total, memo)
    return SaveResult(info=info, bytes_written=counts[0] + pages[0] + len(manifest),
                      chunks_written=counts[1] + pages[1])


def _shared(blob: Blob) -> bool:
    from .local import _shared as shared

    return shared(blob)


def check_root(doc: dict[str, Any], where: str) -> tuple[str, prolly.Params]:
    try:
        root = doc["root"]
        if not isinstance(root, str) or len(root) != 64 or doc["pages"].get("hash") != prolly.PAGE_HASH:
            raise ValueError(f"bad root {root!r}")
        int(root, 16)
        return root, prolly.Params.from_json(doc["pages"])
    except Exception as exc:
        raise CorruptVersion(f"{where}: bad root record ({exc})") from None


def blob_of(doc: dict[str, Any], where: str) -> Any:
    default_hash = doc.get("hash", hashing.LEGACY)

    def make(value: list[Any]) -> Blob:
        try:
            if value[0] == "b":
                return blob_from_record(value[1], where, default_hash)
            kind, dtype, shape, nbytes = Blob.check_descriptor(value[1])
            data = value[2]
            if not isinstance(data, bytes) or len(data) != nbytes:
                raise ValueError("inline leaf has the wrong size")
            return Blob(kind=kind, dtype=dtype, shape=shape, nbytes=nbytes, data=memoryview(data))
        except CorruptVersion:
            raise
        except Exception as exc:
            raise CorruptVersion(f"{where}: bad leaf record ({exc})") from None

    return make


def tree_from_pages(get: prolly.Get, doc: dict[str, Any], where: str, path: tuple[str | int, ...] = ()) -> Any:
    """The state (or the subtree at ``path``, reading only the pages on it) of a format-2 root record, its
    pages from ``get`` (see :class:`.objects.Reader`, or pages fetched from a bucket). ``NotFound`` when
    the version has nothing at ``path``."""
    root, _params = check_root(doc, where)
    lo = sp.enc_path(path)
    entries = prolly.iterate(root, get, where, lo, lo + sp.SUBTREE_END if path else None)
    first = next(entries, None)
    if first is None or first[0] != lo:
        raise NotFound(f"{where} has nothing at {list(path)!r}")

    def chained() -> Iterator[tuple[bytes, bytes]]:
        assert first is not None
        yield first
        yield from entries

    return sp.unflatten(chained(), blob_of(doc, where), where, base=lo)


NO_LINKS: Final[tuple[tuple[str, ...], tuple[str, ...]]] = ((), ())


def fresh_links(raw: bytes, digest: str, where: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A page's child pages and chunks, from the bytes a save writes. A leaf page without the bytes of a
    chunked leaf's tag (``["b", ...``) has neither, without a decode (most pages of an agent's state)."""
    if raw[2:3] == b"\x00" and b"\xa1b" not in raw:
        return NO_LINKS
    children, chunks = page_links(raw, digest, {}, where)
    return tuple(children), tuple(chunks)


def page_links(raw: bytes, digest: str, doc: dict[str, Any], where: str) -> tuple[list[str], dict[str, int]]:
    """A page's child pages and the chunks (digest -> size) its leaves are stored in."""
    page = prolly.decode_page(raw, digest, where)
    chunks = {c.digest: c.size for b in _page_blobs(page, blob_of(doc, where), where) for c in b.chunks or ()}
    return [r.digest for r in page.refs], chunks


def version_objects(store: JobStore, doc: dict[str, Any], where: str,
                    skip: Container[str] = frozenset()) -> dict[str, int]:
    """Every object (page or chunk: digest -> stored-size hint) a format-2 version needs, for an upload,
    not descending into the pages in ``skip`` (whose whole subtrees the bucket is known to hold)."""
    root, _params = check_root(doc, where)
    out: dict[str, int] = {}
    stack = [root]
    while stack:
        digest = stack.pop()
        if digest in out or digest in skip:
            continue
        raw = store.read_page(digest)
        out[digest] = len(raw)
        children, chunks = page_links(raw, digest, doc, where)
        out.update(chunks)
        stack.extend(children)
    return out


def referenced(store: JobStore, doc: dict[str, Any], where: str, marked: set[str], verify: bool = False) -> None:
    """Add to ``marked`` the pages and chunks a root record reaches, not descending into pages already
    marked (shared subtrees are walked once across all versions). With ``verify`` every page is read and
    every chunk re-hashed; without, what a page references is remembered (:data:`JobStore.page_refs`:
    pages never change, so neither does that), so marking the versions a save keeps reads only the pages
    that save wrote."""
    root, _params = check_root(doc, where)
    if not verify:
        _mark(store, root, where, marked, blob_of(doc, where))
        return
    make = blob_of(doc, where)
    for digest, page in prolly.walk_pages(root, store.read_page, where, marked.__contains__):
        marked.add(digest)
        for blob in _page_blobs(page, make, where):
            assert blob.chunks is not None
            store.verify_chunks(blob.chunks, where, marked)
            marked.update(c.digest for c in blob.chunks)


def _page_blobs(page: prolly.Page, make: Any, where: str) -> Iterator[Blob]:
    for _key, raw in page.items:
        if raw[1:3] == b"\xa1b":  # cheap pre-check of ["b", ...]: most items are not chunked leaves
            value = sp.decode_value(raw, where)
            if value[0] == "b":
                yield make(value)


def _mark(store: JobStore, digest: str, where: str, marked: set[str], make: Any) -> None:
    stack = [digest]
    while stack:
        d = stack.pop()
        if d in marked:
            continue
        refs = store.page_refs.get(d)
        if refs is None:
            page = prolly.load_page(store.read_page, d, where)
            chunks = tuple(c.digest for b in _page_blobs(page, make, where) for c in b.chunks or ())
            refs = (tuple(r.digest for r in page.refs), chunks)
            store.page_refs[d] = refs
        marked.add(d)
        marked.update(refs[1])
        stack.extend(refs[0])
