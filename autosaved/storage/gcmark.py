"""Garbage collection by marking, kept between collections, so a collection after a save costs what that
save and the versions it dropped changed, not the job's history (issue 20, item 6).

A job's objects form a graph: each version references its root page (format 2) or its chunks (format 1);
each page references its child pages or, for a leaf page, the chunks of its chunked leaves. :class:`LiveSet`
keeps, for every object reachable from a version on disk, how many distinct referencers it has (versions
or pages). Marking a version adds one reference to its root and descends only into pages not yet marked,
so a subtree shared with a version already marked (all of it but the pages a save rewrote) costs nothing;
dropping a version removes that reference and descends only into pages whose count falls to zero, which
are exactly the objects that became unreachable. Both walks read O(changed pages) pages and list no
directory.

Why counts kept in memory and not a full mark per collection (what every collection did before): a full
mark reads or visits every page of every retained version and lists every object of the job, O(history)
per save: with ``keep_last`` small, each save drops one version and paid that. Why not persisted: the
counts follow from the manifests on disk, so a fresh :class:`LiveSet` (a daemon start, a store object made
by a command) rebuilds them with one full mark and a full sweep at its first collection (unless its job had
nothing stored when it first saved: then the empty counts are exact from the start); that sweep also
removes what a crash left behind (a save's chunks and pages without a manifest, a collection cut short).
Nothing on disk has to be kept in step with them, so they add no crash window. A save that fails in this
process marks the set ``stale``, so the next collection is a full one again and removes that save's
leftovers.

Safety (as before): manifests are deleted (and ``versions/`` fsynced) before any object, and an object is
deleted only once nothing on disk reaches it. Every collection first marks the versions it has not seen
(written since, or by another process), then drops the ones gone; a version it cannot read blocks every
deletion, as a full collection does. Where a dropped page cannot be read its children keep their counts:
a leak until the next full collection, never a deletion of something live. A page's bytes could in
principle also be some leaf's chunk: pages and chunks are counted apart, and a file goes only when
neither count holds it.

Not safe for concurrent collections of one job: the daemon runs saves and retention of a job under its
io lock, as before.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CorruptVersion, NotFound, StorageError
from . import fileops, paged
from .compress import SUFFIX
from .faults import point

if TYPE_CHECKING:
    from .local import GcResult, JobStore

BLOCKED = "not collecting garbage while a manifest is unreadable (see `autosaved verify`)"


@dataclass
class GcStats:
    """What collections did, cumulatively: tests assert a collection's work follows the change."""

    full: int = 0  # full marks (and sweeps)
    incremental: int = 0
    manifests_read: int = 0
    pages_read: int = 0
    objects_listed: int = 0  # directory entries a sweep looked at
    objects_deleted: int = 0


class _Blocked(Exception):
    pass


class LiveSet:
    """Reference counts of a job's live objects (digests as 32 bytes: half a hex string's memory)."""

    def __init__(self) -> None:
        self.pages: dict[bytes, int] = {}
        self.chunks: dict[bytes, int] = {}
        # Each marked version: the pages and chunks it references itself (its root, or a format-1 manifest's
        # chunks), kept so that dropping it does not need its manifest, which is gone by then.
        self.versions: dict[int, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = {}
        # True until a full mark succeeded, and again after anything that may leave objects no count knows
        # (a failed save, an unreadable page of a dropped version, a blocked collection).
        self.stale = True
        self.stats = GcStats()
        self._checked_new = False

    def forget(self) -> None:
        """Drop the counts (an evicted job's memory): its next collection marks everything again."""
        self.pages, self.chunks, self.versions = {}, {}, {}
        self.stale = True

    def adopt_if_new(self, store: JobStore) -> None:
        """Before a store object's first save: a job with no version and no object yet has exact (empty)
        counts without a full mark, so a job the daemon creates never pays one (checked once: two
        listings)."""
        if self._checked_new or not self.stale:
            return
        self._checked_new = True
        try:
            if os.listdir(store.objects_dir):
                return
        except FileNotFoundError:
            pass
        if not store.version_ids():
            self.stale = False

    def mark_new(self, store: JobStore) -> None:
        """Mark the versions on disk not marked yet: before retention deletes manifests, so a version
        written and deleted between two collections still gives its objects back (its manifest is gone by
        the collection)."""
        if self.stale:
            return  # the next collection is a full one: it sweeps whatever those held
        try:
            for vid in store.version_ids():
                if vid not in self.versions:
                    self._mark_version(store, vid)
        except _Blocked:
            pass  # stale now: the collection will say it is blocked

    def collect(self, store: JobStore) -> GcResult:
        """Delete what the versions dropped since the last collection made unreachable (all garbage, with a
        full mark and sweep, while ``stale``)."""
        if self.stale:
            return self.full(store)
        point("gc", "collect", "before", store.job)
        self.stats.incremental += 1
        try:
            garbage = self._sync(store)
        except _Blocked:
            self.stale = True
            return _result(blocked=BLOCKED)
        return self._delete(store, garbage)

    def full(self, store: JobStore) -> GcResult:
        """Mark every version from scratch, then delete every object file nothing marked (``autosaved gc``,
        and a set's first collection)."""
        point("gc", "collect", "before", store.job)
        self.stats.full += 1
        self.pages.clear()
        self.chunks.clear()
        self.versions.clear()
        self.stale = True
        try:
            self._sync(store)
        except _Blocked:
            return _result(blocked=BLOCKED)
        self.stale = False
        result = _result()
        for sub in store._object_dirs():
            try:
                entries = list(os.scandir(sub))
            except FileNotFoundError:
                continue
            for entry in entries:
                self.stats.objects_listed += 1
                if not self._live(entry.name.removesuffix(SUFFIX)):  # either stored form of a live object stays
                    _remove(entry.path, result)
        self.stats.objects_deleted += result.removed_chunks
        return result

    def _live(self, name: str) -> bool:
        try:
            key = bytes.fromhex(name)
        except ValueError:
            return False  # not an object's name: nothing references it
        return key in self.pages or key in self.chunks

    def _sync(self, store: JobStore) -> set[bytes]:
        """Mark the versions on disk not marked yet, then drop the marked ones gone from disk; the objects
        whose counts fell to zero. New first: an object a new version shares with a dropped one never
        touches zero."""
        ids = store.version_ids()
        for vid in ids:
            if vid not in self.versions:
                self._mark_version(store, vid)
        on_disk = set(ids)
        garbage: set[bytes] = set()
        for vid in [v for v in self.versions if v not in on_disk]:
            self._drop_version(store, vid, garbage)
        return garbage

    def _mark_version(self, store: JobStore, vid: int) -> None:
        where = f"{store.job} version {vid}"
        try:
            doc = store.read_manifest(vid)
            self.stats.manifests_read += 1
            if doc["format"] == paged.FORMAT:
                root, _params = paged.check_root(doc, where)
                refs: tuple[tuple[bytes, ...], tuple[bytes, ...]] = ((bytes.fromhex(root),), ())
            else:
                refs = ((), tuple({bytes.fromhex(str(d)) for rec in doc["blobs"] for d, _ in rec["chunks"]}))
            self.versions[vid] = refs
            for chunk in refs[1]:
                self.chunks[chunk] = self.chunks.get(chunk, 0) + 1
            self._mark_pages(store, list(refs[0]), where)
        except NotFound:
            return  # deleted since the listing: it references nothing any more
        except (CorruptVersion, StorageError, ValueError, KeyError, TypeError) as exc:
            # Half marked, maybe: the counts are no longer to be trusted either.
            self.stale = True
            raise _Blocked(str(exc)) from None

    def _mark_pages(self, store: JobStore, stack: list[bytes], where: str) -> None:
        while stack:
            digest = stack.pop()
            n = self.pages.get(digest, 0)
            self.pages[digest] = n + 1
            if n:
                continue  # marked already: so is everything below it
            children, chunks = self._links(store, digest, where)
            for chunk in chunks:
                self.chunks[chunk] = self.chunks.get(chunk, 0) + 1
            stack.extend(children)

    def _drop_version(self, store: JobStore, vid: int, garbage: set[bytes]) -> None:
        pages, chunks = self.versions.pop(vid)
        for chunk in chunks:
            self._unref_chunk(chunk, garbage)
        stack = list(pages)
        where = f"{store.job} version {vid} (dropped)"
        while stack:
            digest = stack.pop()
            n = self.pages[digest] - 1
            if n:
                self.pages[digest] = n
                continue
            del self.pages[digest]
            garbage.add(digest)
            try:
                children, page_chunks = self._links(store, digest, where)
            except CorruptVersion:
                # Its children keep a count they no longer have: never deleted by mistake, swept by the
                # next full collection.
                self.stale = True
                continue
            for chunk in page_chunks:
                self._unref_chunk(chunk, garbage)
            stack.extend(children)

    def _unref_chunk(self, chunk: bytes, garbage: set[bytes]) -> None:
        n = self.chunks[chunk] - 1
        if n:
            self.chunks[chunk] = n
        else:
            del self.chunks[chunk]
            garbage.add(chunk)

    def _links(self, store: JobStore, digest: bytes, where: str) -> tuple[list[bytes], set[bytes]]:
        """A page's child pages and the chunks its leaves are stored in (read and checked against its name)."""
        hexdigest = digest.hex()
        fresh = store.fresh_links.pop(hexdigest, None)  # a page the last save wrote: it knows them
        if fresh is not None:
            return [bytes.fromhex(c) for c in fresh[0]], {bytes.fromhex(c) for c in fresh[1]}
        raw = store.read_page(hexdigest)
        self.stats.pages_read += 1
        children, chunks = paged.page_links(raw, hexdigest, {}, where)
        return [bytes.fromhex(c) for c in children], {bytes.fromhex(c) for c in chunks}

    def _delete(self, store: JobStore, garbage: set[bytes]) -> GcResult:
        result = _result()
        for digest in sorted(garbage):
            if digest in self.pages or digest in self.chunks:
                continue  # a page's bytes that are also a live chunk (or the reverse)
            name = digest.hex()
            for path in (store.object_path(name), store.object_path(name, compressed=True)):
                _remove(str(path), result)
        self.stats.objects_deleted += result.removed_chunks
        return result


def _remove(path: str, result: GcResult) -> None:
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return
    point("chunk", "delete", "before", path)
    with contextlib.suppress(FileNotFoundError):
        fileops.unlink(path, missing_ok=True)
    point("chunk", "delete", "after", path)
    result.removed_chunks += 1
    result.freed_bytes += size


def _result(blocked: str | None = None) -> GcResult:
    from .local import GcResult

    return GcResult(blocked=blocked)
