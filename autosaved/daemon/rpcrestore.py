"""The restore handler: the live state or a stored version (pulled from the bucket first if this host
lacks it), whole or some paths, sent inline or through a memfd on the client's fd connection.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import anyio
import anyio.to_thread
import msgpack

from ..errors import ProtocolError
from ..protocol import INLINE_LEAF_MAX, INLINE_TOTAL_MAX, blob_descriptors, inline_allowed, validate_path
from ..shm import layout, release_mapping
from ..state import State
from ..storage.base import JobStorage
from ..storage.fsutil import pwrite_all
from ..storage.local import JobStore
from ..storage.pathread import subtrees
from ..tree import Blob, Packed, to_node
from .jobs import Job
from .rpcbase import HandlerBase, Reply, RpcRequest, _opt_int, log

MAX_PATHS = 4096


def _paths(raw: Any) -> list[tuple[str | int, ...]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or len(raw) > MAX_PATHS:
        raise ProtocolError(f"paths must be a list of at most {MAX_PATHS} paths")
    return [validate_path(p) for p in raw]


def _subtree(tree: Any, path: tuple[str | int, ...]) -> Any:
    """The node at ``path`` under ``tree``; ``None`` when a key is missing or a step is not a mapping."""
    for key in path:
        if type(tree) is Packed:
            tree = tree.open()
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


class RestoreOps(HandlerBase):
    """The ``restore`` op."""

    async def op_restore(self, req: RpcRequest) -> Reply:
        name = self._job_name(req)
        version = _opt_int(req.header, "version")
        paths = _paths(req.header.get("paths"))
        # Loaded (log replayed) if it exists: a restore after a restart sees every ``logged`` update.
        table = self.ctx.table
        job = await table.find(req.owner, name) if version is None else table.jobs.get((req.owner, name))
        store = job.store if job else self.ctx.table.store.job(req.owner, name)
        if version is not None and self.ctx.replicator is not None:
            job = await self._pull(req.owner, name, version) or job
        # The job's io lock from taking the tree until its leaves are read: a leaf of a loaded state (or of
        # a stored version) is read from chunk files, and a save's retention and gc (or `autosaved gc`),
        # which hold this lock, could otherwise delete them meanwhile, once a newer update replaced the
        # leaf (the soak's "restore raised CorruptVersion(... (live state): chunk ... is missing)").
        if version is None and job is not None and job.resident:
            # The live tree, kept (not evicted by the state cache) while it is sent.
            async with table.use(job), table.io_lock((req.owner, name)):
                return await self._restore_locked(req, version, paths, job, store)
        async with table.io_lock((req.owner, name)):
            if version is None and job is not None and not job.resident:
                return await self._restore_evicted(req, paths, job, store)
            return await self._restore_locked(req, version, paths, job, store)

    async def _restore_evicted(self, req: RpcRequest, paths: Any, job: Job, store: JobStorage) -> Reply:
        """The live state of a job the state cache evicted (under its io lock: no save or gc meanwhile).
        Its newest version holds exactly that state: some paths of a format-2 version are read from the
        pages on them alone (storage/pathread.py), leaving the job evicted; anything else loads the tree
        back first."""
        version = job.latest_version
        if paths is not None and version is not None and isinstance(store, JobStore):
            sent = await anyio.to_thread.run_sync(lambda: subtrees(store, version, paths))
            if sent is not None and not job.resident:  # still evicted: nothing newer was merged meanwhile
                self.ctx.table.cache.path_reads += 1
                return await self._send_tree(req, store, sent, {"version": version, "step": job.step, "live": True})
        async with self.ctx.table.use(job):
            return await self._restore_locked(req, None, paths, job, store)

    async def _restore_locked(self, req: RpcRequest, version: int | None, paths: Any, job: Job | None,
                              store: JobStorage) -> Reply:
        if version is None and job is not None and (job.dirty or job.latest_version is not None or job.root):
            tree: State | None = job.root
            info: dict[str, Any] = {"version": job.latest_version, "step": job.step, "live": True}
        else:
            if version is None:
                # With a path only the subtree's leaves are read, in _send_tree.
                loaded = await anyio.to_thread.run_sync(lambda: store.load_newest(load_data=paths is None))
            else:
                # Chunks are read (and verified) once, straight into what is sent: no staging copy.
                loaded = await anyio.to_thread.run_sync(lambda: store.load(version, load_data=False, verify=False))
            if loaded is None:
                return Reply({"tree": None, "blobs": [], "version": None})
            tree = loaded.tree
            info = {"version": loaded.info.id, "step": loaded.info.step, "live": False}
        sent: Any = tree if paths is None else [_subtree(tree, p) for p in paths]
        # A live state's slots stay lent until the bytes are copied out (a stored one reads no slot).
        hold = self.ctx.table.ledger.hold_tree(sent) if info["live"] else None
        try:
            return await self._send_tree(req, store, sent, info)
        finally:
            if hold is not None:
                hold.release()

    async def _pull(self, owner: int, name: str, version: int) -> Job | None:
        """A restore by id of a version this host lacks, with ``[remote]``: copy it here from the bucket
        first. The job is loaded first (on a fresh host that seeds its newest version), and only ids below
        its next one are pulled: a bucket version this host would number itself is not its own."""
        assert self.ctx.replicator is not None
        store = self.ctx.table.store.job(owner, name)
        if version in await anyio.to_thread.run_sync(store.version_ids):
            return None
        job = await self.ctx.table.find(owner, name)
        if job is None or version >= job.next_version:
            return job
        async with job.io_lock:  # no save or gc of the job while a version is written into its store
            if version not in await anyio.to_thread.run_sync(store.version_ids):
                await self.ctx.replicator.pull(owner, name, version, self.ctx.replicator.local_store(owner, name))
        return job

    async def _send_tree(self, req: RpcRequest, store: JobStorage, tree: Any, info: dict[str, Any]) -> Reply:
        # Small bytes leaves in memory go inside the header for an SDK that reads them (protocol 2): a
        # LangGraph record and its channel values come back as one frame.
        inline = INLINE_LEAF_MAX if inline_allowed(req.header) else 0
        node, blobs = to_node(tree, inline_max=inline, inline_total=INLINE_TOTAL_MAX)
        # What the reply may make the daemon hold (read buffers, a memfd) is charged before it is read.
        with self.ctx.reply_reserve(req.owner, sum(b.nbytes for b in blobs)):
            return await self._build_tree_reply(req, store, node, blobs, info)

    async def _build_tree_reply(self, req: RpcRequest, store: JobStorage, node: Any, blobs: list[Blob],
                                info: dict[str, Any]) -> Reply:
        shm = await self._restore_through_memfd(req, store, blobs)
        placed = {i for i, _ in shm["refs"]} if shm else set()
        live = self.ctx.slots.live_mappings()

        def read(blob: Blob) -> memoryview:
            # A live client may write into its slot once the daemon lets go of it, which could happen
            # before ZeroMQ has sent this reply: copy those bytes. Slots of gone clients are never reused.
            if blob.data is not None and id(blob.data.obj) in live:
                return memoryview(bytes(blob.data))
            return store.read_blob(blob)

        sent = [b for i, b in enumerate(blobs) if i not in placed]
        if sum(b.nbytes for b in sent) <= INLINE_TOTAL_MAX and all(b.data is not None for b in sent):
            # In memory and small (a LangGraph get_tuple): nothing to read, at most a small copy, so no hop
            # to a worker thread, which on a busy host cost a restore milliseconds (perf, issue 21).
            frames = [read(b) for b in sent]
        else:
            frames = await anyio.to_thread.run_sync(lambda: [read(b) for b in sent])
        return Reply({"tree": node, "blobs": blob_descriptors(blobs), **info, **({"shm": shm} if shm else {})},
                     frames)

    async def _restore_through_memfd(self, req: RpcRequest, store: JobStorage,
                                     blobs: list[Blob]) -> dict[str, Any] | None:
        """Put the bulk leaves of a restore into a fresh memfd and hand it to the client's fd connection:
        the client maps it and builds arrays over it, with no copy of its own. ``None``: send inline."""
        token = req.header.get("shm_conn")
        conn = self.ctx.slots.conns.get(token) if isinstance(token, str) else None
        if conn is None or conn.uid != req.owner or conn.send_fds is None:
            return None
        refs, total = layout(blobs)
        if not refs:
            return None

        def fill() -> int:
            # Stored leaves go file → memfd in the kernel (sendfile), live ones with pwrite. The memfd is
            # not preallocated and only ever written through syscalls: no memory gives ENOSPC, never SIGBUS.
            fd = os.memfd_create("autosaved-restore", os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, total)
                mapping = mmap.mmap(fd, total, flags=mmap.MAP_SHARED)
                for i, off in refs:
                    data = blobs[i].data
                    if data is None:
                        store.send_blob(blobs[i], fd, off, mapping)
                    else:
                        pwrite_all(fd, data, off)
                release_mapping(mapping)
            except BaseException:
                os.close(fd)
                raise
            return fd

        try:
            fd = await anyio.to_thread.run_sync(fill)
        except OSError as exc:  # no memory for the buffer: the frames still work
            log.warning("restore of %s through shared memory failed (%s); sending inline", store.job, exc)
            return None
        try:
            await conn.send_fds(msgpack.packb({"seq": req.seq}), [fd])
        finally:
            os.close(fd)
        return {"seq": req.seq, "size": total, "refs": [list(r) for r in refs]}
