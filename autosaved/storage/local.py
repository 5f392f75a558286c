"""The local-directory store: one folder per job, versions as manifests over content-addressed chunks.

Layout under the state dir::

    jobs/<owner uid>/<job>/versions/<id>.json    committed manifests (a version exists iff its manifest does)
    jobs/<owner uid>/<job>/objects/<ab>/<digest> chunks (BLAKE3 or SHA-256: see hashing), shared by every version
                                           (``<digest>.zst``: stored zstd-compressed, see :mod:`.compress`)
    jobs/<owner uid>/<job>/log/<lsn>.wal         write-ahead log segments (see :mod:`.wal`)
    jobs/<owner uid>/<job>/tmp/                  temp files; anything here after a crash is garbage

A save writes each chunk it lacks (temp, fsync, rename), fsyncs the object directories, then commits the
manifest (temp, fsync, rename, fsync ``versions/``). A crash at any instant leaves either no new manifest
(the previous version is newest and whole) or a complete one. Unchanged leaves hash to chunks the store
already has, so a save writes only what changed. Retention deletes manifests first and chunks second, so
a crash during garbage collection can only leave unreferenced chunks, which the next collection removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import mmap
import os
import re
import secrets
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CorruptVersion, NotFound, StorageError
from ..names import validate_job_name
from ..settings import KeepBest
from ..state import merge
from ..tree import Blob, Chunk, from_node, to_node
from . import fileops, gcmark, hashing, paged
from . import objects as obj
from .chunkwriter import ChunkPipeline, fsync_dirs
from .compress import SUFFIX, compress_chunk, worth_trying
from .faults import point
from .fsutil import (
    Pacer,
    atomic_write,
    fsync_dir,
    make_dirs,
    pwrite_all,
    temp_name,
)
from .manifest import (
    FORMAT_VERSION,
    HASH_NAME,
    VersionInfo,
    blob_from_record,
    blob_record,
    seal,
    utc_now_iso,
)
from .retention import best_versions, score, versions_to_delete
from .slotwrite import store_slot_leaf
from .wal import LogChanged, LogDamaged, Replay, read_log, scan_segment, segments

log = logging.getLogger("autosaved.storage")

# Format 1 (the whole state in the manifest) or 2 (a root record over pages, see paged.py).
WRITE_FORMAT = 1
_VERSION_FILE = re.compile(r"^(\d{12})\.json$")
DIR_MODE = 0o750
# How often recover() starts again when a daemon's commit changed the log under an offline reader.
_RECOVER_TRIES = 5
_HASH_POOL = obj.HASH_POOL


# Chunks of a shared-memory leaf copied (or written, slotwrite) and hashed ahead of the one being written.
_SHARED_WINDOW = max(2, min(8, os.cpu_count() or 2))


def _shared(blob: Blob) -> bool:
    """Whether the blob's bytes live in a client's shared-memory slot (a mapping the client can write)."""
    return blob.data is not None and isinstance(blob.data.obj, mmap.mmap)


def submit_digests(data: memoryview, chunk_size: int, algo: str = HASH_NAME) -> list[tuple[int, Future[str]]]:
    """Start hashing ``data``'s chunks in the pool; (size, digest future) per chunk."""
    fn = hashing.HASHERS[algo]
    pieces = [data[i : i + chunk_size] for i in range(0, data.nbytes, chunk_size)] or [data[:0]]
    return [(p.nbytes, _HASH_POOL.submit(fn, p)) for p in pieces]


def chunk_digests(data: memoryview, chunk_size: int) -> tuple[Chunk, ...]:
    return tuple(Chunk(f.result(), n, HASH_NAME) for n, f in submit_digests(data, chunk_size))


@dataclass
class GcResult:
    deleted_versions: list[int] = field(default_factory=list)
    removed_chunks: int = 0
    freed_bytes: int = 0
    blocked: str | None = None
    # Versions retention would have deleted but kept because they are not yet in the object store.
    kept_unreplicated: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"deleted_versions": self.deleted_versions, "removed_chunks": self.removed_chunks,
                "freed_bytes": self.freed_bytes, "blocked": self.blocked,
                "kept_unreplicated": self.kept_unreplicated}


@dataclass
class SaveResult:
    info: VersionInfo
    bytes_written: int
    chunks_written: int


@dataclass
class Recovered:
    version: LoadedVersion | None
    tree: Any
    sessions: dict[str, int]
    step: int | None
    meta: dict[str, Any]
    replay: Replay


@dataclass
class LoadedVersion:
    info: VersionInfo
    tree: Any
    sessions: dict[str, int]
    # The last write-ahead log record the version covers.
    wal_lsn: int = 0


def _sendfile_chunk(fd: int, out_fd: int, at: int, chunk: Chunk, where: str) -> None:
    """Copy the raw chunk file ``fd`` into ``out_fd`` at ``at`` inside the kernel."""
    if os.fstat(fd).st_size != chunk.size:
        raise CorruptVersion(f"{where}: chunk {chunk.digest[:16]}… has the wrong size")
    os.lseek(out_fd, at, os.SEEK_SET)
    sent = 0
    while sent < chunk.size:
        n = os.sendfile(out_fd, fd, sent, chunk.size - sent)
        if n == 0:
            raise CorruptVersion(f"{where}: chunk {chunk.digest[:16]}… is truncated")
        sent += n


class JobStore:
    """The stored versions of one job. Not safe for concurrent writers: the daemon serialises saves of a
    job, and readers (offline restore, ``list``) only ever see committed manifests."""

    def __init__(self, root: Path, owner: int, job: str) -> None:
        self.job = validate_job_name(job)
        self.owner = owner
        self.path = root / "jobs" / str(owner) / job
        self.versions_dir = self.path / "versions"
        self.objects_dir = self.path / "objects"
        self.tmp_dir = self.path / "tmp"
        self.log_dir = self.path / "log"
        # The job's folder as a backend of the one page/chunk store, and the reader every restore uses.
        self.objects = obj.LocalBackend(self.path, self.tmp_dir, DIR_MODE)
        self.reader = obj.Reader(self.objects, self.job)
        # The format new versions are written in (the daemon sets it from the config; see paged.py).
        self.write_format = WRITE_FORMAT
        # Format 2: what the last save or load left for the next save to diff against (paged.Cache).
        self.paged_cache: paged.Cache | None = None
        # Format 2: page digest -> (child pages, chunks) it references, for gc's marking (paged.referenced).
        self.page_refs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        # Format 2: the same for the pages the last save wrote, so marking its version reads none of them.
        self.fresh_links: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        # What the versions on disk reference, kept between collections so retention after a save sweeps
        # only what the dropped versions alone held (gcmark.py).
        self.live = gcmark.LiveSet()

    # -- writing ---------------------------------------------------------------------------------

    def ensure_dirs(self) -> None:
        for d in (self.versions_dir, self.objects_dir, self.tmp_dir):
            make_dirs(d, DIR_MODE)

    def clean_tmp(self) -> None:
        """Remove temp files a crashed save left behind."""
        if self.tmp_dir.is_dir():
            for leftover in self.tmp_dir.iterdir():
                fileops.unlink(leftover, missing_ok=True)

    def object_path(self, digest: str, compressed: bool = False) -> Path:
        return self.objects.path(obj.object_name(digest, compressed))

    def has_object(self, digest: str) -> bool:
        """Whether the chunk is stored, in either form: dedup is by the raw bytes' digest."""
        return self.object_path(digest).exists() or self.object_path(digest, True).exists()

    def write_version(
        self,
        tree: Any,
        *,
        version: int,
        step: int | None,
        reason: str,
        meta: dict[str, Any],
        sessions: dict[str, int],
        chunk_size: int,
        pace: Pacer | None = None,
        wal_lsn: int = 0,
        compression: str = "off",
        changed: paged.Changed | None = None,
    ) -> SaveResult:
        """Commit ``tree`` as version ``version``. ``pace`` (see :data:`fsutil.Pacer`) throttles the
        chunk writes; the manifest, a few KB, is never held back. ``compression`` is a mode of
        :mod:`.compress`; it only decides how new chunks are stored, never their names. ``changed``: the
        paths the daemon's merges changed since an earlier version (format 2 then diffs only those)."""
        self.live.adopt_if_new(self)
        try:
            if self.write_format == paged.FORMAT:
                return paged.write_version(self, tree, version, step, reason, meta, sessions, chunk_size, pace,
                                           wal_lsn, compression, changed)
            return self._write_version(tree, version, step, reason, meta, sessions, chunk_size, pace, wal_lsn,
                                       compression)
        except OSError as exc:
            self.live.stale = True  # its chunks and pages without a manifest: the next collection sweeps all
            raise StorageError(f"saving {self.job} version {version} failed: {exc}") from exc
        except BaseException:
            self.live.stale = True
            raise

    def _write_version(
        self, tree: Any, version: int, step: int | None, reason: str, meta: dict[str, Any],
        sessions: dict[str, int], chunk_size: int, pace: Pacer | None, wal_lsn: int, compression: str,
    ) -> SaveResult:
        self.ensure_dirs()
        node, blobs = to_node(tree)
        records: list[dict[str, Any]] = []
        counts = [0, 0]
        dirs_touched: set[Path] = set()
        # Every leaf is hashed in the pool ahead of the writes below, so hashing overlaps writing. Leaves in
        # a client's shared-memory slot are not: the client can still write there, so their chunks are
        # copied first and named by the hash of the copy, which is what gets written (see _write_shared).
        ahead = {id(b): submit_digests(b.data, chunk_size) for b in blobs
                 if b.data is not None and chunk_size not in b.digests and not _shared(b)}
        # Chunk n's fsync and rename run in the pipeline's syncer while chunk n+1 is written (chunkwriter).
        pipeline = ChunkPipeline(pace)
        try:
            self.write_chunks(blobs, ahead, chunk_size, compression, pipeline, records, dirs_touched, counts)
            pipeline.finish()  # every chunk durable under its name before any manifest names it
        except BaseException:
            pipeline.abandon()
            raise
        written, chunks_written = counts
        # objects/ itself too: an objects/<ab>/ made by an earlier, failed save may not be durable either.
        dirs_touched.add(self.objects_dir)
        # All before the manifest (defect 6: dedup'd chunks' dirs included); among themselves the order
        # does not matter, so they run concurrently.
        fsync_dirs(dirs_touched)

        info = VersionInfo(
            job=self.job, id=version, step=step, time=utc_now_iso(), bytes=sum(b.nbytes for b in blobs),
            reason=reason, meta=meta,
        )
        body = {
            "format": FORMAT_VERSION, "hash": HASH_NAME, "job": self.job, "version": version, "step": step,
            "time": info.time, "reason": reason, "meta": meta, "bytes": info.bytes, "sessions": sessions,
            "wal_lsn": wal_lsn, "tree": node, "blobs": records,
        }
        manifest = seal(body)
        atomic_write(self.versions_dir / f"{version:012d}.json", manifest, self.tmp_dir)
        return SaveResult(info=info, bytes_written=written + len(manifest), chunks_written=chunks_written)

    def _put_chunk(self, digest: str, data: bytes | memoryview, try_compress: bool, pipeline: ChunkPipeline,
                   dirs_touched: set[Path]) -> int:
        """Write one chunk the store lacks through the pipeline (durable and renamed in by the syncer)."""
        packed = compress_chunk(memoryview(data)) if try_compress else None
        target = self.object_path(digest, compressed=packed is not None)
        if not target.parent.is_dir():
            fileops.mkdir(target.parent, DIR_MODE, exist_ok=True)
        tmp = temp_name(self.tmp_dir, digest)
        n = pipeline.put(tmp, target, data if packed is None else packed)
        dirs_touched.add(target.parent)
        return n

    def write_chunks(self, blobs: list[Blob], ahead: dict[int, list[tuple[int, Future[str]]]], chunk_size: int,
                      compression: str, pipeline: ChunkPipeline, records: list[dict[str, Any]],
                      dirs_touched: set[Path], counts: list[int]) -> None:
        """Queue every chunk the store lacks; ``counts`` gets [bytes written, chunks written]."""
        written = chunks_written = 0
        queued: set[str] = set()  # written by this save but maybe not renamed yet: do not write twice
        for blob in blobs:
            write_shared = _shared(blob) and chunk_size not in blob.digests
            if not write_shared:
                if id(blob) in ahead:
                    blob.digests[chunk_size] = tuple(Chunk(f.result(), n, HASH_NAME) for n, f in ahead[id(blob)])
                chunks = self._chunks_of(blob, chunk_size)
                if _shared(blob) and not all(c.digest in queued or self.has_object(c.digest) for c in chunks):
                    # A cached hash of shared bytes that must be written again: hash what is written instead.
                    del blob.digests[chunk_size]
                    write_shared = True
            if write_shared:
                rec, n_bytes, n_chunks = self._write_shared(blob, chunk_size, compression, pipeline, dirs_touched,
                                                            queued)
                records.append(rec)
                written += n_bytes
                chunks_written += n_chunks
                continue
            try_compress = worth_trying(blob, compression)
            offset = 0
            for chunk in chunks:
                stored = chunk.digest in queued or self.has_object(chunk.digest)
                # Power loss: a chunk found here may have been renamed in by a save that failed or was
                # killed before it fsynced the directory, so its name may not be durable yet. Every
                # directory holding a chunk this version references is fsynced before the manifest.
                dirs_touched.add(self.object_path(chunk.digest).parent)
                if blob.data is not None and not stored:
                    # Written now, made durable and renamed by the pipeline while the next one is written.
                    written += self._put_chunk(chunk.digest, blob.data[offset : offset + chunk.size], try_compress,
                                               pipeline, dirs_touched)
                    queued.add(chunk.digest)
                    chunks_written += 1
                elif blob.data is None and not stored:
                    raise StorageError(f"chunk {chunk.digest} of a stored leaf is missing from {self.objects_dir}")
                offset += chunk.size
            records.append(blob_record(blob, chunks))
        counts[:] = [written, chunks_written]

    def _write_shared(self, blob: Blob, chunk_size: int, compression: str, pipeline: ChunkPipeline,
                      dirs_touched: set[Path], queued: set[str]) -> tuple[dict[str, Any], int, int]:
        """Store a leaf whose bytes live in a client's shared-memory slot, which the client may still write
        into (a forked child, a stray pointer): each chunk is named by the hash of the bytes stored, never
        of bytes read from the slot a second time. Uncompressed, the chunk goes from the slot into its file
        and the file is hashed (:mod:`.slotwrite`); compressed, it is copied once into private memory and
        the copy is hashed, compressed and written. So a chunk's name is always the hash of its
        stored bytes, and a scribbling client can only change what its own version holds, never make the
        store hold a chunk that does not match its name (which dedup would spread into later versions).
        Named with the store's algorithm (``HASH_NAME``) like every other new chunk; written through the
        same pipeline (the write of the private copy is synchronous, so the copy can go once ``put``
        returns; only the fsync and rename are deferred)."""
        assert blob.data is not None
        data = blob.data
        try_compress = worth_trying(blob, compression)
        if not try_compress:
            # No private copy: each chunk is named by the hash of the file it was written to (slotwrite).
            pairs, written, count = store_slot_leaf(
                data, chunk_size, HASH_NAME, pipeline=pipeline, pool=_HASH_POOL, window=_SHARED_WINDOW,
                tmp_dir=self.tmp_dir, object_path=self.object_path, stored=self.has_object, queued=queued,
                dirs_touched=dirs_touched)
            done = tuple(Chunk(digest, size, HASH_NAME) for digest, size in pairs)
            blob.digests[chunk_size] = done
            return blob_record(blob, done), written, count
        starts = list(range(0, data.nbytes, chunk_size)) or [0]
        hash_fn = hashing.HASHERS[HASH_NAME]

        def copy_and_hash(start: int) -> tuple[bytes, Future[str]]:
            private = bytes(data[start : start + chunk_size])
            return private, _HASH_POOL.submit(hash_fn, memoryview(private))

        chunks: list[Chunk] = []
        written = count = 0
        # A few chunks are copied ahead and hashed in the pool (in parallel) while one is written: the copy
        # costs one memcpy, the hashing keeps the pool's parallelism, memory stays at WINDOW chunks.
        window = deque(copy_and_hash(start) for start in starts[:_SHARED_WINDOW])
        ahead = iter(starts[_SHARED_WINDOW:])
        while window:
            private, digest_future = window.popleft()
            nxt = next(ahead, None)
            if nxt is not None:
                window.append(copy_and_hash(nxt))
            digest = digest_future.result()
            chunks.append(Chunk(digest, len(private), HASH_NAME))
            # Defect 6: the directory of a dedup'd chunk is fsynced before the manifest too.
            dirs_touched.add(self.object_path(digest).parent)
            if digest not in queued and not self.has_object(digest):
                written += self._put_chunk(digest, private, try_compress, pipeline, dirs_touched)
                queued.add(digest)
                count += 1
        done = tuple(chunks)
        blob.digests[chunk_size] = done  # what this version holds; a later save dedups against it
        return blob_record(blob, done), written, count

    @staticmethod
    def _chunks_of(blob: Blob, chunk_size: int) -> tuple[Chunk, ...]:
        if blob.data is None:
            assert blob.chunks is not None
            return blob.chunks
        cached = blob.digests.get(chunk_size)
        if cached is None:
            cached = chunk_digests(blob.data, chunk_size)
            blob.digests[chunk_size] = cached  # blobs are immutable, so the hash stays true
        return cached

    # -- reading ---------------------------------------------------------------------------------

    def has_version(self, version: int) -> bool:
        return (self.versions_dir / f"{version:012d}.json").exists()

    def read_page(self, digest: str) -> bytes:
        return self.reader.page(digest)

    def leaf_records(self, version: int) -> list[dict[str, Any]]:
        """The records (descriptor and chunks, as in a format-1 manifest) of a version's leaves stored as
        chunks, in the state's order; leaves inline in format-2 pages have none."""
        doc = self.read_manifest(version)
        if doc["format"] != paged.FORMAT:
            return list(doc["blobs"])
        _tree, blobs = self.reader.tree(doc, f"{self.job} version {version}")
        return [blob_record(b, b.chunks) for b in blobs if b.chunks is not None]

    def load_path(self, version: int, path: tuple[str | int, ...]) -> Any:
        """The subtree at ``path`` of a stored version, its binary leaves read and verified. For format 2 it
        reads only the pages on the path and the leaves below it; a format-1 manifest is read whole."""
        return self.reader.load_path(self.read_manifest(version), f"{self.job} version {version}", tuple(path))

    def version_ids(self) -> list[int]:
        try:
            names = os.listdir(self.versions_dir)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StorageError(f"cannot list {self.versions_dir}: {exc.strerror}") from exc
        return sorted(int(m.group(1)) for n in names if (m := _VERSION_FILE.match(n)))

    def read_manifest(self, version: int) -> dict[str, Any]:
        path = self.versions_dir / f"{version:012d}.json"
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"job {self.job!r} has no version {version}") from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        return obj.open_record(raw, self.job, version, str(path))

    def _info(self, doc: dict[str, Any], ok: bool = True, error: str | None = None) -> VersionInfo:
        return dataclasses.replace(obj.version_info(doc, self.job), ok=ok, error=error)

    def load(self, version: int, *, load_data: bool = True, verify: bool = True) -> LoadedVersion:
        """Read one version. With ``verify`` every chunk is hashed; any mismatch raises CorruptVersion.
        Without ``load_data`` the blobs keep only their chunk lists (the daemon's lazy base state)."""
        where = f"{self.job} version {version}"
        doc = self.read_manifest(version)
        tree, blobs = self.reader.tree(doc, where)
        if load_data:
            self.reader.fill(blobs, where, verify=verify)
        elif verify:
            for blob in blobs:
                assert blob.chunks is not None
                self.reader.verify_chunks(blob.chunks, where)
        return LoadedVersion(info=self._info(doc), tree=tree, sessions=obj.sessions_of(doc),
                             wal_lsn=int(doc.get("wal_lsn", 0)))

    def read_blob(self, blob: Blob) -> memoryview:
        """The bytes of a blob: in memory already, or read from its chunks and verified."""
        if blob.data is not None:
            return blob.data
        assert blob.chunks is not None
        point("restore", "read", "before", self.job)
        buf = bytearray(blob.nbytes)
        self.reader.read_chunks(blob.chunks, memoryview(buf), f"{self.job} (live state)")
        return memoryview(buf)

    def send_blob(self, blob: Blob, out_fd: int, offset: int, mapping: mmap.mmap) -> None:
        """Copy a stored blob into ``out_fd`` at ``offset`` inside the kernel (``sendfile``: no user-space
        copy, no page faults on fresh memory) and verify each chunk through ``mapping``, a shared mapping
        of ``out_fd``, while the next chunk is copied. Compressed chunks are decompressed in user space and
        written with ``pwrite``; the check through ``mapping`` is the same for both forms."""
        check = memoryview(mapping)[offset : offset + blob.nbytes]
        assert blob.chunks is not None
        where = f"{self.job} (restore)"
        pending = []
        pos = 0
        for chunk in blob.chunks:
            path = self.object_path(chunk.digest)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raw = bytearray(chunk.size)
                # The .zst form, or CorruptVersion.
                location = self.reader.read_chunk(chunk, memoryview(raw), where)
                pwrite_all(out_fd, memoryview(raw), offset + pos)
            else:
                location = str(path)
                try:
                    _sendfile_chunk(fd, out_fd, offset + pos, chunk, where)
                finally:
                    os.close(fd)
            piece = check[pos : pos + chunk.size]
            pending.append((chunk, location, _HASH_POOL.submit(obj.chunk_ok, chunk, piece)))
            pos += chunk.size
        for chunk, location, ok in pending:
            if not ok.result():
                raise obj.corrupt(where, "chunk", chunk.digest, "does not match its hash", location)
        check.release()

    def verify_chunks(self, chunks: tuple[Chunk, ...], where: str, seen: set[str] | None = None) -> None:
        self.reader.verify_chunks(chunks, where, seen)

    def verify(self, version: int, seen: set[str] | None = None) -> VersionInfo:
        """Re-hash one version; returns its info with ``ok`` and ``error`` set instead of raising."""
        try:
            doc = self.read_manifest(version)
        except CorruptVersion as exc:
            return VersionInfo(self.job, version, None, "", 0, "", {}, ok=False, error=str(exc))
        where = f"{self.job} version {version}"
        if doc["format"] == paged.FORMAT:
            try:
                paged.referenced(self, doc, where, seen if seen is not None else set(), verify=True)
                self.reader.tree(doc, where)
            except Exception as exc:
                return self._info(doc, ok=False, error=str(exc))
            return self._info(doc)
        try:
            algo = doc.get("hash", hashing.LEGACY)
            for rec in doc["blobs"]:
                blob = blob_from_record(rec, where, algo)
                assert blob.chunks is not None
                self.verify_chunks(blob.chunks, where, seen)
            from_node(doc["tree"], [blob_from_record(r, where, algo) for r in doc["blobs"]])
        except Exception as exc:
            return self._info(doc, ok=False, error=str(exc))
        return self._info(doc)

    def list_versions(self, *, verify: bool = True) -> list[VersionInfo]:
        seen: set[str] = set()
        out = []
        for vid in self.version_ids():
            if verify:
                out.append(self.verify(vid, seen))
            else:
                try:
                    out.append(self._info(self.read_manifest(vid)))
                except CorruptVersion as exc:
                    out.append(VersionInfo(self.job, vid, None, "", 0, "", {}, ok=False, error=str(exc)))
        return out

    def load_newest(self, *, load_data: bool = True,
                    on_skip: Callable[[CorruptVersion], None] | None = None) -> LoadedVersion | None:
        """The newest version that verifies; corrupt newer ones are reported and skipped, never returned."""
        for vid in reversed(self.version_ids()):
            try:
                return self.load(vid, load_data=load_data)
            except CorruptVersion as exc:
                log.warning("skipping corrupt version: %s", exc)
                if on_skip is not None:
                    on_skip(exc)
        return None

    def recover(self, *, load_data: bool = True, repair: bool = False,
                on_skip: Callable[[CorruptVersion], None] | None = None) -> Recovered | None:
        """The newest durable state: the newest verified version plus the write-ahead log records after
        it. ``repair`` (only for the daemon, which owns the log) cuts torn log tails off."""
        for attempt in range(_RECOVER_TRIES):
            ids = self.version_ids()
            base = self.load_newest(load_data=load_data, on_skip=on_skip)
            try:
                replay = read_log(self.log_dir, base.wal_lsn if base else 0, repair=repair)
            except LogChanged:
                if attempt + 1 == _RECOVER_TRIES:
                    raise
                continue
            # An offline reader racing a daemon's commit: a newer version appeared meanwhile and may have
            # dropped log segments this base needed (with or without leaving a gap). Start again from the
            # newest version rather than serve an older state.
            if attempt + 1 == _RECOVER_TRIES or self.version_ids() == ids:
                break
        for warning in replay.warnings:
            log.warning("%s: %s", self.job, warning)
        if base is None and not replay.records:
            return None
        rec = Recovered(version=base, tree=base.tree if base else {}, sessions=dict(base.sessions) if base else {},
                        step=base.info.step if base else None, meta=dict(base.info.meta) if base else {},
                        replay=replay)
        for record in replay.records:
            rec.tree = merge(rec.tree, record.delta)
            rec.sessions.update(record.sessions)
            if record.step is not None:
                rec.step = record.step
            rec.meta.update(record.meta)
        return rec

    def unsaved_log_records(self) -> int:
        """How many write-ahead log records a replay would apply over the newest version (cheap: reads the
        newest manifest and the log, not the chunks), so ``list`` shows a job with only logged updates as
        having unsaved state whether or not a daemon has it loaded. A damaged log counts as one."""
        try:
            return len(read_log(self.log_dir, self._newest_wal_lsn()).records)
        except StorageError:
            return 1

    def _newest_wal_lsn(self) -> int:
        """The log position the newest readable manifest covers (0 without one)."""
        for vid in reversed(self.version_ids()):
            try:
                return int(self.read_manifest(vid).get("wal_lsn", 0))
            except (CorruptVersion, NotFound, StorageError, ValueError):
                continue
        return 0

    # -- retention -------------------------------------------------------------------------------

    def apply_retention(self, keep_last: int, protect: set[int] | None = None,
                        keep_every: float | None = None, *, collect: bool = True,
                        keep_best: KeepBest | None = None) -> list[int]:
        """Delete the versions :func:`~.retention.versions_to_delete` picks (never one in ``protect``),
        manifests first, then collect the objects only the deleted versions reached (see gcmark.py: a
        collection costs what changed since the last one). Returns the deleted ids."""
        doomed = self._doomed(keep_last, keep_every, frozenset(protect or ()), keep_best)
        if doomed and collect:
            self.live.mark_new(self)
        for vid in doomed:
            point("version", "delete", "before", vid)
            fileops.unlink(self.versions_dir / f"{vid:012d}.json", missing_ok=True)
            point("version", "delete", "after", vid)
        if doomed:
            fsync_dir(self.versions_dir, "version")
            if collect and (blocked := self.live.collect(self).blocked):
                log.warning("%s: %s", self.job, blocked)
        return doomed

    def _doomed(self, keep_last: int, keep_every: float | None, protect: frozenset[int],
                keep_best: KeepBest | None) -> list[int]:
        """What retention deletes: each manifest read once, for its time (and its ``keep_best`` score)."""
        times: list[tuple[int, float | None]] = []
        scores: dict[int, float | None] = {}
        for vid in self.version_ids():
            try:
                doc = self.read_manifest(vid)
                when: float | None = datetime.fromisoformat(str(doc["time"])).timestamp()
                if keep_best is not None:
                    scores[vid] = score(doc.get("meta"), keep_best.metric)
            except (CorruptVersion, NotFound, ValueError, StorageError, KeyError):
                when = None
            times.append((vid, when))
        return versions_to_delete(times, keep_last=keep_last, keep_every=keep_every, protect=protect,
                                  keep_best=keep_best, scores=scores)

    def best_versions(self, keep_best: KeepBest) -> list[int]:
        """The versions ``keep_best`` keeps now (``list`` marks them)."""
        scores: dict[int, float | None] = {}
        for vid in self.version_ids():
            try:
                scores[vid] = score(self.read_manifest(vid).get("meta"), keep_best.metric)
            except (CorruptVersion, NotFound, StorageError):
                continue
        return best_versions(scores, keep_best)

    def version_time(self, version: int) -> float | None:
        """When a version was committed (unix seconds), or ``None`` if its manifest cannot be read."""
        try:
            return datetime.fromisoformat(str(self.read_manifest(version)["time"])).timestamp()
        except (CorruptVersion, NotFound, ValueError, StorageError):
            return None

    def newest_verified(self) -> int | None:
        for vid in reversed(self.version_ids()):
            if self.verify(vid).ok:
                return vid
        return None

    def referenced_digests(self, skip: frozenset[int] = frozenset()) -> set[str] | None:
        """Digests every manifest (but those in ``skip``) references; ``None`` when a manifest cannot be
        read (GC must then not run: it could delete chunks of a version it failed to parse)."""
        refs: set[str] = set()
        for vid in self.version_ids():
            if vid in skip:
                continue
            try:
                doc = self.read_manifest(vid)
                if doc["format"] == paged.FORMAT:
                    paged.referenced(self, doc, f"{self.job} version {vid}", refs)
                    continue
            except CorruptVersion:
                return None
            for rec in doc["blobs"]:
                refs.update(str(d) for d, _ in rec["chunks"])
        return refs

    def collect_garbage(self) -> GcResult:
        """Delete every object no manifest references (a full mark and sweep, see gcmark.py). Crash-safe
        because manifests go first: an object is only ever deleted once nothing can reach it, and a crash
        half-way leaves garbage for the next full collection."""
        result = self.live.full(self)
        if result.blocked:
            log.warning("%s: %s", self.job, result.blocked)
        return result

    def _would_collect(self, doomed: frozenset[int]) -> GcResult:
        """The chunks ``collect_garbage`` would delete once the versions ``doomed`` are gone (a dry run)."""
        refs = self.referenced_digests(skip=doomed)
        if refs is None:
            return GcResult(blocked="not collecting garbage while a manifest is unreadable (see `autosaved verify`)")
        result = GcResult()
        for sub in self._object_dirs():
            for entry in os.scandir(sub):
                if entry.name.removesuffix(SUFFIX) not in refs:
                    result.removed_chunks += 1
                    result.freed_bytes += entry.stat().st_size
        return result

    def gc(self, keep_last: int, keep_every: float | None, protect: set[int] | None = None, *,
           dry_run: bool = False, keep_best: KeepBest | None = None) -> GcResult:
        """Retention and collection on demand (``autosaved gc``); never deletes the newest version that
        verifies, nor one in ``protect`` (with ``[remote]``: the versions not yet in the object store).
        Leftover temp files of crashed saves go too. ``dry_run``: what would go, touching nothing."""
        if not dry_run:
            self.clean_tmp()
        newest_ok = self.newest_verified()
        keep = {newest_ok} if newest_ok is not None else set()
        held = set(protect or ())
        would = self._doomed(keep_last, keep_every, frozenset(keep), keep_best)
        if dry_run:
            result = self._would_collect(frozenset(set(would) - held))
            result.deleted_versions = sorted(set(would) - held)
            result.kept_unreplicated = sorted(set(would) & held)
            return result
        deleted = self.apply_retention(keep_last, keep | held, keep_every, collect=False, keep_best=keep_best)
        result = self.collect_garbage()  # also when nothing was deleted: crashes may have left chunks
        result.deleted_versions = deleted
        result.kept_unreplicated = sorted(set(would) & held)
        return result

    def check(self) -> dict[str, Any]:
        """Re-hash every version and read the whole write-ahead log (``autosaved verify``)."""
        versions = self.list_versions(verify=True)
        segs = segments(self.log_dir)
        scans = [scan_segment(path) for _, path in segs]
        torn = [s.torn for s in scans if s.torn and not s.damaged]
        damaged = [s.torn for s in scans if s.damaged]
        if not damaged:
            try:  # what only the whole log shows: a cut older segment, a gap after replayed records
                read_log(self.log_dir, self._newest_wal_lsn())
            except LogDamaged as exc:
                damaged.append(str(exc))
        return {
            "job": self.job, "owner": self.owner,
            "ok": all(v.ok for v in versions) and not damaged,
            "versions": [v.to_json() for v in versions],
            "log": {"segments": len(segs), "records": sum(len(s.records) for s in scans), "torn": torn,
                    "damaged": damaged},
        }

    def _object_dirs(self) -> Iterator[Path]:
        try:
            subs = sorted(self.objects_dir.iterdir())
        except FileNotFoundError:  # no chunk yet, or the job is being deleted
            return
        for sub in subs:
            if sub.is_dir():
                yield sub

    def delete(self) -> None:
        """Remove the job's folder. It is first renamed away (atomic), so a crash half-way through the
        removal leaves a hidden ``.deleted.*`` folder that the next delete sweeps, never a half job."""
        parent = self.path.parent
        if self.path.exists():
            grave = parent / f".deleted.{self.job}.{secrets.token_hex(4)}"
            fileops.replace(self.path, grave)
            fsync_dir(parent)
        if parent.is_dir():
            for leftover in parent.iterdir():
                if leftover.name.startswith(".deleted."):
                    with contextlib.suppress(OSError):
                        fileops.rmtree(leftover)

    def stored_bytes(self) -> int:
        """Bytes of the job's chunk files. A listing races gc and delete: a chunk or folder that vanished
        while it was being counted no longer takes space, so it counts 0 (never an error)."""
        total = 0
        for sub in self._object_dirs():
            try:
                entries = list(os.scandir(sub))
            except FileNotFoundError:
                continue
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        return total


class Store:
    """All jobs under one state dir."""

    def __init__(self, root: Path, write_format: int = 1) -> None:
        self.root = root
        self.write_format = write_format

    def job(self, owner: int, job: str) -> JobStore:
        js = JobStore(self.root, owner, job)
        js.write_format = self.write_format
        return js

    def jobs(self, owner: int | None = None) -> list[JobStore]:
        """Jobs of ``owner`` (all owners when ``None``) that have a folder."""
        base = self.root / "jobs"
        owners = [str(owner)] if owner is not None else (sorted(os.listdir(base)) if base.is_dir() else [])
        out = []
        for o in owners:
            d = base / o
            if not o.isdigit() or not d.is_dir():
                continue
            for name in sorted(os.listdir(d)):
                if name.startswith(".deleted."):
                    continue  # a job being deleted (see JobStore.delete)
                try:
                    out.append(self.job(int(o), name))
                except Exception:
                    log.warning("ignoring folder with an invalid job name: %s", d / name)
        return out
