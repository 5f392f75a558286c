"""One page/chunk store, two backends: the format logic of stored versions, written once.

A job's stored data is a set of named objects, the same names on a local disk and in a bucket::

    objects/<ab>/<digest>[.zst]   chunks and format-2 pages: content-addressed, immutable, checked by name
    versions/<id>...json          manifests / format-2 root records (sealed JSON, see :mod:`.manifest`)

(the bucket adds its ``lease.json`` and ``gc.json``, see :mod:`.remote`). Where the bytes live is a
:class:`Backend`: get/put/exists/list/delete of named objects, with a create-only put (``If-None-Match: *``
on a bucket) where a writer must never overwrite. Two implement it:

- :class:`LocalBackend`: the job's folder. A put writes a temp file, fsyncs it and renames it in, all
  through :mod:`.fileops` (fault injection and the power-loss trace see every step); the caller fsyncs the
  folders it touched, once for many objects, before it commits a manifest that names them (the local
  commit protocol, :mod:`.local`).
- :class:`~.remote.BucketBackend`: the job's prefix in an S3 bucket (create-only puts; the bucket has no
  rename). The S3 client is async; the backend runs its calls from a worker thread, so the one reader
  below serves both.

What the bytes mean lives here, once, for both: object names (:func:`object_name`), the opening of a
root record (:func:`open_record`: sealed, a format this autosaved reads, naming its job and version), the
check of a chunk (its size, its zstd form, its hash under the algorithm that named it) and of a page (the
BLAKE3 of its bytes), with one wording for every failure, and :class:`Reader`, which reads a version's
tree (format 1 from its manifest, format 2 from only the pages on a path, :func:`.paged.tree_from_pages`)
and fills its leaves from verified chunks. Every tree of either store is decoded by a :class:`Reader`:
local restore (``JobStore.load``/``load_path``/``read_blob``/``verify``), the bucket's restore by path
(``RemoteJob.load_version(path=...)``: one GET per page on the path) and its whole-version download and
seed, which fetch many pages and chunks at once on the event loop and hand the reader what they fetched,
each object checked by the functions here. The replicator's upload reads local pages through it too.

What stays with each store is what differs by nature: the local writer's pipeline (fsync batching, the
throttle, sendfile into a restore's memfd), the bucket's lease, fences and version keys (``<id>.e<epoch>``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, Protocol

from ..errors import CorruptVersion, NotFound
from ..tree import Blob, Chunk
from . import fileops, hashing, paged, prolly
from . import statepages as sp
from .compress import SUFFIX, ChunkDecodeError, decompress_chunk
from .fsutil import read_exact, temp_name
from .manifest import VersionInfo, tree_from_manifest, unseal

# Hashing runs in threads: hashlib and blake3 release the GIL on large buffers, so two cores hash twice as fast.
HASH_POOL: Final = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)),
                                      thread_name_prefix="autosaved-hash")
OBJECTS: Final = "objects"
VERSIONS: Final = "versions"


def object_name(digest: str, packed: bool = False) -> str:
    """The name of a chunk or page (``packed``: its zstd form, see :mod:`.compress`)."""
    return f"{OBJECTS}/{digest[:2]}/{digest}{SUFFIX if packed else ''}"


class Backend(Protocol):
    """Named objects of one job. Sync: the bucket's backend runs its async client from a worker thread."""

    def get(self, name: str) -> bytes | memoryview:
        """The object's bytes; ``FileNotFoundError`` when there is none."""
        ...

    def get_into(self, name: str, into: memoryview) -> None:
        """Fill ``into`` with the object, which must be exactly that long (``OSError`` otherwise)."""
        ...

    def put(self, name: str, data: bytes | memoryview, *, create: bool = False) -> bool:
        """Store an object durably; with ``create``, ``False`` (nothing written) when it exists already."""
        ...

    def exists(self, name: str) -> bool: ...

    def list(self, prefix: str) -> list[str]:
        """The names under ``prefix`` (a folder: ``objects``, ``versions``)."""
        ...

    def delete(self, names: Sequence[str]) -> None: ...

    def locate(self, name: str) -> str:
        """Where the object lives, for messages: a path, or the bucket's key."""
        ...


# -- checking what was read ------------------------------------------------------------------------


def chunk_ok(chunk: Chunk, data: bytes | memoryview) -> bool:
    """Whether ``data`` is ``chunk``: its size, and its digest under the algorithm that named it."""
    return len(data) == chunk.size and hashing.HASHERS[chunk.hash](memoryview(data)) == chunk.digest


def corrupt(where: str, kind: str, digest: str, problem: str, location: str) -> CorruptVersion:
    """The one wording of a bad stored object, whichever backend it came from."""
    return CorruptVersion(f"{where}: {kind} {digest[:16]}… {problem} ({location})")


def decode_chunk(chunk: Chunk, stored: bytes | memoryview, packed: bool, where: str,
                 location: str) -> bytes | memoryview:
    """The raw bytes of ``chunk`` from its stored form (zstd when ``packed``), unhashed."""
    if not packed:
        return stored
    try:
        return decompress_chunk(bytes(stored), chunk.size)
    except ChunkDecodeError as exc:
        raise corrupt(where, "chunk", chunk.digest, f"does not decompress ({exc})", location) from None


def check_chunk(chunk: Chunk, stored: bytes | memoryview, packed: bool, where: str,
                location: str) -> bytes | memoryview:
    """``chunk``'s raw bytes from its stored form, verified; else :class:`CorruptVersion`."""
    raw = decode_chunk(chunk, stored, packed, where, location)
    if not chunk_ok(chunk, raw):
        raise corrupt(where, "chunk", chunk.digest, "does not match its hash", location)
    return raw


def check_page(digest: str, raw: bytes, where: str, location: str) -> bytes:
    """A page's bytes if they are named ``digest``; else :class:`CorruptVersion`."""
    if prolly.page_digest(raw) != digest:
        raise corrupt(where, "page", digest, "does not match its hash", location)
    return raw


class NothingAt(NotFound):
    """The version exists but holds nothing at the path asked for (a restore by path answers ``None``)."""


# -- root records ----------------------------------------------------------------------------------


def open_record(raw: bytes, job: str, version: int, location: str) -> dict[str, Any]:
    """A manifest or format-2 root record of ``job``'s ``version``: sealed (its digest checked), of a
    format this autosaved reads (a newer one is refused, see :func:`.manifest.check_format`), and naming
    that job and version; else :class:`CorruptVersion` naming where it lives."""
    where = f"{job} version {version}"
    doc = unseal(raw, f"{where} ({location})")
    if doc.get("job") != job or doc.get("version") != version:
        raise CorruptVersion(f"{where}: the manifest names another job or version ({location})")
    return doc


def version_info(doc: dict[str, Any], job: str) -> VersionInfo:
    """What ``list`` shows of a version, from its opened record."""
    return VersionInfo(job=job, id=int(doc["version"]), step=doc.get("step"), time=str(doc.get("time")),
                       bytes=int(doc.get("bytes", 0)), reason=str(doc.get("reason", "")),
                       meta=dict(doc.get("meta") or {}))


def sessions_of(doc: dict[str, Any]) -> dict[str, int]:
    """The client sessions a version covers (session id -> last sequence number)."""
    return {str(k): int(v) for k, v in (doc.get("sessions") or {}).items()}


# -- reading ---------------------------------------------------------------------------------------


class Reader:
    """Reads versions of one job from a backend: pages, chunks, and trees by path, every object verified.
    ``packed``: the chunks stored in zstd form when the backend's manifest says so (the bucket's);
    ``None``: look for the raw form first, then the zstd one (the local store keeps no such list)."""

    def __init__(self, backend: Backend, label: str) -> None:
        self.backend = backend
        self.label = label  # ``where`` of reads outside a version (a page of the daemon's cached tree)

    def page(self, digest: str, where: str | None = None) -> bytes:
        where = where or self.label
        name = object_name(digest)
        try:
            raw = bytes(self.backend.get(name))
        except FileNotFoundError:
            raise corrupt(where, "page", digest, "is missing", self.backend.locate(name)) from None
        except OSError as exc:
            raise corrupt(where, "page", digest, f"cannot be read: {exc}", self.backend.locate(name)) from None
        return check_page(digest, raw, where, self.backend.locate(name))

    def read_chunk(self, chunk: Chunk, into: memoryview, where: str, packed: bool | None = None) -> str:
        """Fill ``into`` with ``chunk``'s raw bytes, unhashed (the caller verifies, maybe in the pool);
        returns the object's location. Missing or undecodable is :class:`CorruptVersion`."""
        forms = (False, True) if packed is None else (packed,)
        for form in forms:
            name = object_name(chunk.digest, form)
            location = self.backend.locate(name)
            try:
                if not form:
                    self.backend.get_into(name, into)
                    return location
                into[:] = decode_chunk(chunk, self.backend.get(name), True, where, location)
                return location
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as exc:
                raise corrupt(where, "chunk", chunk.digest, f"cannot be read: {exc}", location) from None
        raise corrupt(where, "chunk", chunk.digest, "is missing",
                      self.backend.locate(object_name(chunk.digest, bool(packed))))

    def read_chunks(self, chunks: tuple[Chunk, ...], into: memoryview, where: str, *, verify: bool = True,
                    packed: set[str] | None = None) -> None:
        """Fill ``into`` with the chunks in order; each is hashed in the pool while the next one is read,
        so verifying costs little beyond the read."""
        pending = []
        offset = 0
        for chunk in chunks:
            view = into[offset : offset + chunk.size]
            location = self.read_chunk(chunk, view, where, None if packed is None else chunk.digest in packed)
            if verify:
                pending.append((chunk, location, HASH_POOL.submit(chunk_ok, chunk, view)))
            offset += chunk.size
        for chunk, location, ok in pending:
            if not ok.result():
                raise corrupt(where, "chunk", chunk.digest, "does not match its hash", location)

    def verify_chunks(self, chunks: tuple[Chunk, ...], where: str, seen: set[str] | None = None) -> None:
        for chunk in chunks:
            if seen is not None and chunk.digest in seen:
                continue
            self.read_chunks((chunk,), memoryview(bytearray(chunk.size)), where)
            if seen is not None:
                seen.add(chunk.digest)

    def fill(self, blobs: Sequence[Blob], where: str, *, verify: bool = True, packed: set[str] | None = None) -> None:
        """Read every stored leaf's bytes (verified unless told not to) into a buffer of its own."""
        for blob in blobs:
            if blob.data is None:
                assert blob.chunks is not None
                buf = bytearray(blob.nbytes)
                self.read_chunks(blob.chunks, memoryview(buf), where, verify=verify, packed=packed)
                blob.data = memoryview(buf)

    def tree(self, doc: dict[str, Any], where: str, path: tuple[str | int, ...] = (),
             fetched: Mapping[str, bytes] | None = None) -> tuple[Any, list[Blob]]:
        """The state (or the subtree at ``path``) a manifest or root record describes and its leaves
        stored as chunks (not read yet). Format 2 reads only the pages on ``path``; a format-1 manifest
        holds the whole tree. :class:`NothingAt` when the version has nothing at ``path``. ``fetched``:
        the version's pages, already fetched and checked (the bucket's concurrent download), by digest."""
        if doc.get("format") == paged.FORMAT:
            get = (lambda d: self.page(d, where)) if fetched is None else fetched.__getitem__
            try:
                tree = paged.tree_from_pages(get, doc, where, path)
            except NotFound as exc:
                raise NothingAt(str(exc)) from None
        else:
            tree, _ = tree_from_manifest(doc, where)
            for elem in path:
                try:
                    tree = tree[elem]
                except (KeyError, IndexError, TypeError):
                    raise NothingAt(f"{where} has nothing at {list(path)!r}") from None
        return tree, [b for b in sp.blobs_of(tree) if b.data is None]  # inline leaves came with their page

    def load_path(self, doc: dict[str, Any], where: str, path: tuple[str | int, ...] = (),
                  packed: set[str] | None = None) -> Any:
        """The subtree at ``path`` with its leaves read and verified: O(log N) pages plus its leaves."""
        tree, blobs = self.tree(doc, where, path)
        self.fill(blobs, where, packed=packed)
        return tree


class LocalBackend:
    """A job's folder as a :class:`Backend` (names are paths under it)."""

    def __init__(self, root: Path, tmp_dir: Path, dir_mode: int = 0o750) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        self.dir_mode = dir_mode

    def path(self, name: str) -> Path:
        return self.root / name

    def get(self, name: str) -> bytes:
        return self.path(name).read_bytes()

    def get_into(self, name: str, into: memoryview) -> None:
        read_exact(self.path(name), into.nbytes, into)

    def put(self, name: str, data: bytes | memoryview, *, create: bool = False) -> bool:
        """Temp, fsync, rename (through fileops); the caller fsyncs the folder before naming it anywhere.
        Objects are immutable and named by content, so a create that finds one leaves it."""
        final = self.path(name)
        if create and final.exists():
            return False
        fileops.write_new(temp_name(self.tmp_dir, final.name), data, final, self.dir_mode)
        return True

    def exists(self, name: str) -> bool:
        return self.path(name).exists()

    def list(self, prefix: str) -> list[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def delete(self, names: Sequence[str]) -> None:
        for name in names:
            fileops.unlink(self.path(name), missing_ok=True)

    def locate(self, name: str) -> str:
        return str(self.path(name))
