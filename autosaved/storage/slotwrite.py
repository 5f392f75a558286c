"""Storing a leaf that lives in a client's shared-memory slot without a private copy of it.

The client may write into a slot the daemon still reads (a forked child, a stray pointer), so a chunk
must never be named by a hash of the slot's bytes and then written from the slot again: the two reads
could see different bytes, and the store would hold a chunk whose name does not match it (which dedup
would then spread into later versions). The save used to copy each chunk into private memory first and
hash and write that copy; the copy (fresh memory, faulted in) cost 22-27% of a 512 MiB save (issue 21).

Here each chunk is written straight from the slot into a new temporary file, and *the file* is hashed:
its pages, mapped read-only from the page cache, are bytes only the daemon can write. The name is the
hash of what is stored, by construction, whatever the client does to the slot meanwhile: a scribbling
client can only change what its own version holds. The hash of chunk *n* runs in the hash pool while
chunk *n+1* is written, and its fsync and rename in the pipeline's syncer after that, so writing,
hashing and syncing overlap. A chunk the store already holds is found only after it was written to the
page cache; its file is dropped unsynced (one memcpy wasted, the same cost as the private copy was).

Compressed chunks are not stored this way: the compressor reads the bytes once and the name must be
the hash of the same bytes, so those keep the private copy (compression costs far more than it).
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from pathlib import Path

from . import fileops, hashing
from .chunkwriter import ChunkPipeline, Written
from .fsutil import temp_name

ObjectPath = Callable[[str], Path]
Stored = Callable[[str], bool]


def digest_of_file(fd: int, size: int, algo: str) -> str:
    """The ``algo`` digest of the first ``size`` bytes of the open file ``fd``, read through a mapping
    of its page cache (no copy)."""
    fn = hashing.HASHERS[algo]
    if size == 0:
        return fn(memoryview(b""))
    with mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ) as mapping:
        view = memoryview(mapping)
        try:
            return fn(view)
        finally:
            view.release()  # before the mapping closes


def store_slot_leaf(data: memoryview, chunk_size: int, algo: str, *, pipeline: ChunkPipeline, pool: Executor,
                    window: int, tmp_dir: Path, object_path: ObjectPath, stored: Stored,
                    queued: set[str], dirs_touched: set[Path]) -> tuple[list[tuple[str, int]], int, int]:
    """Write ``data`` (a view into a slot) as chunks of ``chunk_size``, each named by the hash of the file
    it was written to. Returns ((digest, size) per chunk, bytes stored, chunks stored); a chunk in
    ``queued`` or ``stored`` is not stored again. ``window`` bounds the chunks written but not yet hashed;
    the pipeline's depth bounds those hashed but not yet durable."""
    starts = range(0, data.nbytes, chunk_size) or range(1)
    chunks: list[tuple[str, int]] = []
    pending: deque[tuple[Written, Future[str]]] = deque()
    totals = [0, 0]

    def settle_oldest() -> None:
        written, future = pending.popleft()
        try:
            digest = future.result()
        except BaseException:
            pipeline.discard(written)
            raise
        chunks.append((digest, written.size))
        target = object_path(digest)
        # Defect 6: the directory of a dedup'd chunk is fsynced before the manifest too.
        dirs_touched.add(target.parent)
        if digest in queued or stored(digest):
            pipeline.discard(written)
            return
        if not target.parent.is_dir():
            fileops.mkdir(target.parent, 0o750, exist_ok=True)
        pipeline.settle(written, target)
        queued.add(digest)
        totals[0] += written.size
        totals[1] += 1

    try:
        for start in starts:
            if len(pending) >= window:
                settle_oldest()
            written = pipeline.write(temp_name(tmp_dir, "slot"), data[start : start + chunk_size], readable=True)
            try:
                future = pool.submit(digest_of_file, written.fd, written.size, algo)
            except BaseException:
                pipeline.discard(written)
                raise
            pending.append((written, future))
        while pending:
            settle_oldest()
    except BaseException:
        for written, future in pending:
            future.exception()  # the hash holds the fd: let it finish before the file goes
            pipeline.discard(written)
        raise
    return chunks, totals[0], totals[1]
