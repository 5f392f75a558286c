"""Publishing one committed local version to the bucket: the commit protocol's writer side.

Only the chunks the bucket lacks go up (create-only, so a 412 is success), read from the local chunk files
with ``aiofiles`` as stored (raw or zstd) and streamed to obstore's async API; then the lease is renewed
and the manifest written last, create-only; then the lease is renewed once more (see below). The daemon's
replicator calls this for each queued version, and the store contract tests call it to fill a bucket the
way the daemon does.

Format 2: the walk of a version's pages stops at pages whose whole subtree the bucket is known to hold
(``complete``), so an upload reads the pages its save wrote, not the whole state. Small objects are not
packed into bigger ones (issue 20 item 5 asked to, where it helps), because it does not pay here: pages
are already 4-16 KiB packs of small leaves (leaves up to 2 KiB live inside them), so a save's new objects
are few (``scripts/remote_path_gets.py``, a LangGraph-shaped history of 1,000 and 10,000 checkpoints: an
upload after 100 puts sent 14 and 16 objects of 6.5-7 kB; after one put, 2 and 3), and a version's fixed
requests (its root record and two lease renewals) are as many as its pages. Packing would cost what the
design relies on: create-only dedup by name (a pack holds many digests, so the bucket would need an index
to dedup against), gc by object (a pack dies only when all its members do, or must be rewritten), and
O(log N) reads by path (a page's pack and offset would need an index that is itself O(N), or another tree
to read).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Container
from typing import Any

import aiofiles
import anyio
import anyio.to_thread

from ..errors import CorruptVersion
from . import faults, paged
from .compress import SUFFIX
from .local import JobStore
from .manifest import unseal
from .remote import Lease, RemoteError, RemoteJob, remote_manifest

# Chunk uploads in flight at once per version: enough to fill a fast link, few enough for a slow one.
UPLOAD_CONCURRENCY = 4


async def _no_pace(_nbytes: int) -> None:
    return None


def referenced(doc: dict[str, Any], local: JobStore, where: str,
               complete: Container[str] = frozenset()) -> dict[str, int]:
    """digest → size of every object a version needs: its chunks, and for format 2 its pages too (read
    from the local store, where they are verified by their names), but none below a page in
    ``complete``: the bucket holds that page's whole subtree, so only the pages on changed paths are read."""
    if doc.get("format") == paged.FORMAT:
        return paged.version_objects(local, doc, where, complete)
    return {str(digest): int(size) for rec in doc["blobs"] for digest, size in rec["chunks"]}


def lacking(refs: dict[str, int], known: dict[str, str]) -> dict[str, int]:
    """digest → size of the objects a version references that the bucket lacks (``known``: what it has)."""
    return {digest: size for digest, size in refs.items() if digest not in known}


async def upload_version(remote: RemoteJob, local: JobStore, version: int, lease: Lease, *, holder: str,
                         ttl: float, known: dict[str, str], complete: set[str] | None = None,
                         pace: Callable[[int], Awaitable[None]] = _no_pace,
                         planned: Callable[[int], None] = lambda _nbytes: None,
                         sent: Callable[[int], None] = lambda _nbytes: None) -> int:
    """Publish local ``version`` under ``lease``; returns how many chunks were sent. ``known`` (digest →
    object key of the chunks the bucket has) is updated as chunks go up. ``pace(n)`` is awaited before
    each chunk of ``n`` bytes is sent (the upload throttle); ``planned(total)`` is told the bytes to send,
    ``sent(n)`` each chunk's bytes once the bucket has them (a 412 counts: the bytes were sent).
    ``complete`` (format 2): pages whose whole subtree the bucket holds, so the walk of this version stops
    there; once the version is published its pages join it. The caller empties it whenever ``known`` may
    have gone stale (a new lease, a remote collection that deleted anything), as it does ``known``.
    :class:`~.remote.Fenced` if the lease was lost; ``CorruptVersion`` if the local version is unreadable."""
    where = f"{local.job} version {version}"
    path = local.versions_dir / f"{version:012d}.json"
    try:
        async with aiofiles.open(path, "rb") as fh:
            raw = await fh.read()
    except FileNotFoundError:
        raise CorruptVersion(f"{where}: the local manifest is gone") from None
    doc = unseal(raw, where)
    refs = await anyio.to_thread.run_sync(referenced, doc, local, where,
                                          frozenset() if complete is None else complete)
    todo = lacking(refs, known)
    planned(sum(todo.values()))
    packed: set[str] = {d for d, k in known.items() if k.endswith(SUFFIX)}
    failures: list[BaseException] = []
    limiter = anyio.CapacityLimiter(UPLOAD_CONCURRENCY)

    async def one(digest: str, scope: anyio.CancelScope) -> None:
        async with limiter:
            try:
                data, is_packed = await read_chunk_file(local, digest)
                await pace(len(data))
                await remote.put_chunk(digest, data, is_packed)
            except (RemoteError, OSError, CorruptVersion) as exc:
                failures.append(exc)
                scope.cancel()
                return
            known[digest] = remote.chunk_key(digest, is_packed)
            if is_packed:
                packed.add(digest)
            sent(len(data))

    async with anyio.create_task_group() as tg:
        for digest in todo:
            tg.start_soon(one, digest, tg.cancel_scope)
    if failures:
        raise failures[0]
    # Renew right before publishing: a daemon that lost its lease finds out here, not after.
    await remote.renew(lease, ttl)
    body = remote_manifest(raw, lease.epoch, holder, sorted(packed & refs.keys()), where, lease.incarnation)
    if faults.active():  # the tests hold an upload here (every chunk sent, no manifest yet) and kill the host
        await anyio.to_thread.run_sync(faults.point, "remote", "manifest", "before", where)
    try:
        await remote.put_manifest(version, lease.epoch, body)
    except RemoteError as exc:
        if "already in the bucket" not in str(exc):
            raise
        # Our own earlier attempt got through but its reply was lost: same epoch, same holder.
    # And renew once more: if that succeeds, no take-over happened before the manifest was written, so
    # any later take-over lists it and fences above it: the version is visible, and may be acked.
    # (Without this, a take-over between our renewal and our manifest would hide a version we acked.)
    await remote.renew(lease, ttl)
    if complete is not None:
        # Every object below these pages is in the bucket now (sent, or listed there) and stays while a
        # published version references it: later uploads need not look below them again.
        complete.update(refs)
    return len(todo)


async def read_chunk_file(local: JobStore, digest: str) -> tuple[bytes, bool]:
    """A local chunk file's stored bytes (raw, or zstd: uploaded as stored) and whether it is packed."""
    for packed in (False, True):
        path = local.object_path(digest, packed)
        try:
            async with aiofiles.open(path, "rb") as fh:
                return await fh.read(), packed
        except FileNotFoundError:
            continue
    raise CorruptVersion(f"{local.job}: local chunk {digest[:16]}… is missing")
