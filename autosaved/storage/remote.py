"""The remote store: a job's versions in an S3-compatible bucket (``obstore``; the ``autosaved[s3]`` extra).

Layout under ``s3://bucket/prefix``, mirroring the local store (see :mod:`.local`)::

    jobs/<owner uid>/<job>/chunks/<ab>/<digest>[.zst]     immutable chunks: the local store's chunk files
    jobs/<owner uid>/<job>/versions/<id>.e<epoch>.json    manifests, written last (a version exists iff this does)
    jobs/<owner uid>/<job>/lease.json                     who may publish, and the fences of past epochs
    jobs/<owner uid>/<job>/gc.json                        chunks seen unreferenced, and since when
    probe/<random>                                        the conditional-write probe (deleted after)

Commit protocol (no rename on a bucket, so no temp + rename): every chunk is written with
``If-None-Match: *`` (a 412 means the bucket has it: success), then the manifest, also ``If-None-Match: *``.
A reader trusts only manifests and checks every page and chunk by its name, so a version whose upload was
cut off is simply not there. Names, checks and the reading of trees by path are the local store's, written
once in :mod:`.objects`; :class:`BucketBackend` is the bucket as its backend.

Fencing: one writer per (owner, job). The lease object names the holder, its epoch and when it expires;
the holder renews it with ``If-Match`` on its ETag (compare-and-swap) before every manifest it writes, so a
lost lease is found before publishing. A new holder takes over with ``epoch + 1`` and records, per older
epoch, the highest version id it saw from that epoch (``fences``): readers ignore a manifest of an older
epoch with a higher id, so a replaced holder that publishes after the take-over (it was partitioned while
listing, say) publishes nothing anyone reads. Reads never need the lease.

Everything here is async and runs on the event loop; chunk files are read and written with ``aiofiles``.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import logging
import mmap
import os
import re
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import anyio
import anyio.from_thread
import numpy as np

from ..errors import ConfigError, CorruptVersion, NotFound, StorageError
from ..names import validate_job_name
from ..settings import Location as Location
from ..settings import parse_url as parse_url
from ..tree import Blob, Chunk
from . import objects as obj
from . import paged, prolly
from .fsutil import atomic_write, fsync_dir
from .local import JobStore
from .manifest import VersionInfo, seal, unseal
from .remote_errors import explain
from .retention import versions_to_delete

log = logging.getLogger("autosaved.remote")
_VERSION_KEY = re.compile(r"(?:^|/)(\d{12})\.e(\d{1,12})\.json$")
_CHUNK_KEY = re.compile(r"(?:^|/)([0-9a-f]{64})(\.zst)?$")
# Downloads and uploads in flight at once per job: enough to fill a fast link, few enough for a slow one.
CONCURRENCY = 8


class RemoteError(StorageError):
    """The object store failed or refused a request (unreachable, denied, misbehaving)."""


class ConditionalWritesIgnored(RemoteError):
    """The store let a second ``If-None-Match: *`` create of one key succeed: two writers could overwrite
    each other's objects there, so autosaved refuses the store (a definite answer, never retried)."""


class LeaseHeld(RemoteError):
    """Another holder's lease is live: this daemon may not publish versions of the job yet."""


class Fenced(RemoteError):
    """This daemon lost its lease (another took over): it must never publish a version of the job again."""


def read_credentials_file(path: Path, profile: str = "default") -> dict[str, str]:
    """An AWS shared-credentials file (INI: ``aws_access_key_id``, ``aws_secret_access_key``, optional
    ``aws_session_token``), so secrets never sit in the TOML."""
    parser = configparser.ConfigParser()
    try:
        with path.open() as fh:
            parser.read_file(fh)
    except OSError as exc:
        raise ConfigError(f"remote.credentials_file: cannot read {path}: {exc.strerror}") from None
    except configparser.Error as exc:
        raise ConfigError(f"remote.credentials_file: {path} is not an AWS credentials file ({exc})") from None
    if profile not in parser:
        raise ConfigError(f"remote.credentials_file: {path} has no [{profile}] section")
    sect = parser[profile]
    if "aws_access_key_id" not in sect or "aws_secret_access_key" not in sect:
        raise ConfigError(f"remote.credentials_file: [{profile}] in {path} needs aws_access_key_id and "
                          "aws_secret_access_key")
    out = {"access_key_id": sect["aws_access_key_id"], "secret_access_key": sect["aws_secret_access_key"]}
    if "aws_session_token" in sect:
        out["token"] = sect["aws_session_token"]
    return out


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise ConfigError("remote storage needs the obstore package: pip install 'autosaved[s3]'") from None
    return obstore


_EXIT_PAUSE_REGISTERED = False


def _pause_at_exit() -> None:
    """Work around obstore 0.12's async API aborting the process at exit: its Tokio worker threads may
    still be finishing (closing pooled connections) when the interpreter finalizes, and one that touches
    Python then aborts (SIGABRT, sometimes SIGBUS) after everything succeeded: 2 of 15 runs of a bare
    ``put_async``/``get_async`` script here. A short pause at exit, before finalization, let 20 of 20
    runs exit cleanly. Registered once, on first use of the client."""
    global _EXIT_PAUSE_REGISTERED
    if not _EXIT_PAUSE_REGISTERED:
        import atexit

        atexit.register(time.sleep, 0.2)
        _EXIT_PAUSE_REGISTERED = True


def _errors() -> Any:
    return _obstore().exceptions


def _wrap(exc: BaseException, what: str, where: str) -> RemoteError:
    """One actionable line (see :mod:`.remote_errors`); the client's whole text at debug level."""
    log.debug("object store %s: %s failed: %s", where, what, exc)
    return RemoteError(explain(str(exc), what, where))


@dataclass(frozen=True)
class VersionKey:
    id: int
    epoch: int
    key: str


@dataclass
class Lease:
    holder: str
    epoch: int
    expires: float
    fences: dict[str, int]
    etag: str | None = None
    # Which incarnation of the job publishes (``None``: a lease written before incarnations existed).
    incarnation: str | None = None
    # A tombstone: the job was deleted; nothing of any epoch is read.
    deleted: bool = False
    # Set by :meth:`RemoteJob.acquire` when this lease ended another live incarnation (not stored).
    replaced: str | None = None

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"holder": self.holder, "epoch": self.epoch, "expires": self.expires,
                               "fences": self.fences}
        if self.incarnation is not None:
            doc["incarnation"] = self.incarnation
        if self.deleted:
            doc["deleted"] = True
        return doc

    def admits(self, vk: VersionKey) -> bool:
        """Whether readers trust a manifest of ``vk``'s epoch and id under this lease (see module doc).
        A new incarnation starts with no fences, so nothing an older (deleted) one published is read."""
        if self.deleted:
            return False
        if vk.epoch == self.epoch:
            return True
        bound = self.fences.get(str(vk.epoch))
        return bound is not None and vk.id <= bound


@dataclass
class RemoteLoaded:
    info: VersionInfo
    tree: Any
    sessions: dict[str, int]
    wal_lsn: int
    doc: dict[str, Any]


@dataclass
class RemoteGc:
    deleted_versions: list[int] = field(default_factory=list)
    removed_chunks: int = 0
    freed_bytes: int = 0


class RemoteStore:
    """One bucket (and prefix). Build with :func:`open_remote`; the obstore client is made on first use."""

    def __init__(self, url: str, *, endpoint: str | None = None, region: str | None = None,
                 credentials: dict[str, str] | None = None, timeout: float = 30.0, max_retries: int = 2) -> None:
        self.location = parse_url(url)
        self.endpoint = endpoint if endpoint is not None else (os.environ.get("AWS_ENDPOINT_URL") or None)
        if self.endpoint is not None and not re.match(r"^https?://[^/\s]+", self.endpoint):
            raise ConfigError(f"remote.endpoint: expected an http(s):// URL, got {self.endpoint!r}")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        self.credentials = credentials
        self.timeout = timeout
        self.max_retries = max_retries
        self._client: Any = None
        # Requests sent, by method (GET, HEAD, PUT, LIST, DELETE): what a bucket bills, and what tests count.
        self.requests: Counter[str] = Counter()

    @property
    def client(self) -> Any:
        if self._client is None:
            obs = _obstore()
            _pause_at_exit()
            config: dict[str, Any] = {}
            if self.endpoint:
                config["endpoint"] = self.endpoint
            # Many S3 servers answer any region; AWS needs the right one. object_store defaults to us-east-1.
            if self.region:
                config["region"] = self.region
            if self.credentials:
                config.update(self.credentials)
            client_options: dict[str, Any] = {"timeout": timedelta(seconds=self.timeout),
                                              "connect_timeout": timedelta(seconds=min(5.0, self.timeout))}
            if self.endpoint and self.endpoint.startswith("http://"):
                client_options["allow_http"] = True  # local servers (SeaweedFS, MinIO) speak plain http
            # Few, quick retries here: the replicator has its own backoff and reports a down store at once.
            retry = {"max_retries": self.max_retries, "retry_timeout": timedelta(seconds=self.timeout),
                     "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                                 "base": 2}}
            try:
                self._client = obs.store.S3Store(self.location.bucket, prefix=self.location.prefix or None,
                                                 config=config, client_options=client_options, retry_config=retry)
            except Exception as exc:
                raise ConfigError(f"remote: cannot set up the S3 client for {self.location.url}: {exc}") from None
        return self._client

    def describe(self) -> str:
        return self.location.url + (f" at {self.endpoint}" if self.endpoint else "")

    def job(self, owner: int, name: str) -> RemoteJob:
        return RemoteJob(self, owner, name)

    # -- raw object operations (the whole storage interface rests on these) ----------------------

    async def put(self, key: str, data: bytes | memoryview, *, create: bool = False,
                  if_match: str | None = None) -> str | None:
        """Write an object; returns its ETag. ``create``: ``If-None-Match: *`` (``FileExistsError`` on
        412); ``if_match``: ``If-Match`` (``PreconditionError`` → :class:`Fenced` at the caller)."""
        obs = _obstore()
        self.requests["PUT"] += 1
        mode: Any = "create" if create else ({"e_tag": if_match} if if_match is not None else "overwrite")
        try:
            result = await obs.put_async(self.client, key, data, mode=mode, use_multipart=False)
        except _errors().AlreadyExistsError:
            raise FileExistsError(key) from None
        except _errors().PreconditionError as exc:
            raise _PreconditionFailed(key) from exc
        except Exception as exc:
            raise _wrap(exc, f"PUT {key}", self.describe()) from None
        etag = result.get("e_tag")
        return str(etag) if etag is not None else None

    async def get(self, key: str) -> tuple[memoryview, str | None]:
        obs = _obstore()
        self.requests["GET"] += 1
        try:
            result = await obs.get_async(self.client, key)
            data = await result.bytes_async()
        except FileNotFoundError:
            raise
        except _errors().NotFoundError:
            raise FileNotFoundError(key) from None
        except Exception as exc:
            raise _wrap(exc, f"GET {key}", self.describe()) from None
        # obstore's Bytes exposes the buffer protocol: no copy into a Python bytes object.
        return memoryview(data), result.meta.get("e_tag")

    async def exists(self, key: str) -> bool:
        """Whether the object is there (a HEAD request)."""
        obs = _obstore()
        self.requests["HEAD"] += 1
        try:
            await obs.head_async(self.client, key)
        except FileNotFoundError:
            return False
        except _errors().NotFoundError:
            return False
        except Exception as exc:
            raise _wrap(exc, f"HEAD {key}", self.describe()) from None
        return True

    async def stream(self, key: str) -> AsyncIterator[memoryview]:
        obs = _obstore()
        self.requests["GET"] += 1
        try:
            result = await obs.get_async(self.client, key)
            async for piece in result:
                yield memoryview(piece)
        except FileNotFoundError:
            raise
        except _errors().NotFoundError:
            raise FileNotFoundError(key) from None
        except Exception as exc:
            raise _wrap(exc, f"GET {key}", self.describe()) from None

    async def list_objects(self, prefix: str) -> list[dict[str, Any]]:
        obs = _obstore()
        self.requests["LIST"] += 1
        try:
            return [m for batch in [await obs.list(self.client, prefix, chunk_size=1000).collect_async()]
                    for m in batch]
        except Exception as exc:
            raise _wrap(exc, f"LIST {prefix}", self.describe()) from None

    async def list_dirs(self, prefix: str) -> list[str]:
        obs = _obstore()
        self.requests["LIST"] += 1
        try:
            result = await obs.list_with_delimiter_async(self.client, prefix)
        except Exception as exc:
            raise _wrap(exc, f"LIST {prefix}/", self.describe()) from None
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in result["common_prefixes"]]

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        obs = _obstore()
        self.requests["DELETE"] += 1
        try:
            await obs.delete_async(self.client, list(keys))
        except Exception as exc:
            raise _wrap(exc, f"DELETE {len(keys)} objects", self.describe()) from None

    # -- bucket-level ----------------------------------------------------------------------------

    async def probe(self) -> None:
        """Check that the store refuses a second create of one key (``If-None-Match: *``): some S3
        gateways ignore the header and would silently let two writers overwrite each other."""
        key = f"probe/{secrets.token_hex(8)}"
        await self.put(key, b"autosaved conditional-write probe 1", create=True)
        try:
            await self.put(key, b"autosaved conditional-write probe 2", create=True)
        except FileExistsError:
            return
        finally:
            with contextlib.suppress(RemoteError):
                await self.delete([key])
        raise ConditionalWritesIgnored(
            f"the object store {self.describe()} ignored If-None-Match: * (a second create of {key} succeeded); "
            "autosaved cannot commit versions safely on it. Use a store with conditional writes (AWS S3, "
            "SeaweedFS, MinIO, R2, GCS's S3 API)."
        )

    async def jobs(self, owner: int | None) -> list[tuple[int, str]]:
        owners = [str(owner)] if owner is not None else await self.list_dirs("jobs")
        out = []
        for o in owners:
            if not o.isdigit():
                continue
            for name in await self.list_dirs(f"jobs/{o}"):
                with contextlib.suppress(Exception):
                    out.append((int(o), validate_job_name(name)))
        return sorted(out)


class _PreconditionFailed(Exception):
    pass


class BucketBackend:
    """A job's prefix in the bucket as a :class:`.objects.Backend`. Its calls are sync: they run the async
    client on the event loop from a worker thread (``anyio.to_thread``), so the one :class:`.objects.Reader`
    reads a bucket as it reads a folder (restore by path: one GET per page on the path, one per chunk)."""

    def __init__(self, job: RemoteJob) -> None:
        self.job = job

    def get(self, name: str) -> memoryview:
        data, _etag = anyio.from_thread.run(self.job.store.get, self.job.key(name))
        return data

    def get_into(self, name: str, into: memoryview) -> None:
        data = self.get(name)
        if data.nbytes != into.nbytes:
            raise OSError(f"object {self.job.key(name)} has {data.nbytes} bytes, not the {into.nbytes} expected")
        into[:] = data

    def put(self, name: str, data: bytes | memoryview, *, create: bool = False) -> bool:
        """Create-only puts (``If-None-Match: *``): ``False`` on 412, the bucket has the object already."""
        async def put() -> bool:
            try:
                await self.job.store.put(self.job.key(name), data, create=create)
            except FileExistsError:
                return False
            return True

        return anyio.from_thread.run(put)

    def exists(self, name: str) -> bool:
        return anyio.from_thread.run(self.job.store.exists, self.job.key(name))

    def list(self, prefix: str) -> list[str]:
        found = anyio.from_thread.run(self.job.store.list_objects, self.job.key(prefix))
        return sorted(self.job.name_of(str(m["path"])) for m in found)

    def delete(self, names: Sequence[str]) -> None:
        anyio.from_thread.run(self.job.store.delete, [self.job.key(n) for n in names])

    def locate(self, name: str) -> str:
        return self.job.key(name)


class RemoteJob:
    """The stored versions of one job in the bucket: chunks, manifests, lease, GC state."""

    def __init__(self, store: RemoteStore, owner: int, job: str) -> None:
        self.store = store
        self.owner = owner
        self.job = validate_job_name(job)
        self.prefix = f"jobs/{owner}/{job}"
        self.objects = BucketBackend(self)
        self.reader = obj.Reader(self.objects, self.job)

    def key(self, name: str) -> str:
        """The bucket key of a named object (:mod:`.objects`); chunks and pages live under ``chunks/``."""
        if name == obj.OBJECTS or name.startswith(obj.OBJECTS + "/"):
            name = "chunks" + name[len(obj.OBJECTS) :]
        return f"{self.prefix}/{name}"

    def name_of(self, key: str) -> str:
        """The object name of a bucket key under the job (the inverse of :meth:`key`)."""
        name = key.removeprefix(self.prefix + "/")
        return obj.OBJECTS + name[len("chunks"):] if name.startswith("chunks/") else name

    def chunk_key(self, digest: str, packed: bool = False) -> str:
        return self.key(obj.object_name(digest, packed))

    def version_key(self, version: int, epoch: int) -> str:
        return f"{self.prefix}/versions/{version:012d}.e{epoch:06d}.json"

    # -- chunks ----------------------------------------------------------------------------------

    async def chunk_index(self, sizes: dict[str, int] | None = None) -> dict[str, tuple[str, float]]:
        """digest → (key, last-modified unix time) of every chunk and page in the bucket (one listing);
        ``sizes`` gets key → bytes from the same listing."""
        out = {}
        for meta in await self.store.list_objects(f"{self.prefix}/chunks"):
            m = _CHUNK_KEY.search(str(meta["path"]))
            if m:
                out[m.group(1)] = (str(meta["path"]), meta["last_modified"].timestamp())
            if sizes is not None:
                sizes[str(meta["path"])] = int(meta["size"])
        return out

    async def put_chunk(self, digest: str, data: bytes | memoryview, packed: bool) -> bool:
        """Upload one chunk; ``False`` when the bucket already had it (412: success all the same)."""
        try:
            await self.store.put(self.chunk_key(digest, packed), data, create=True)
        except FileExistsError:
            return False
        return True

    # -- manifests -------------------------------------------------------------------------------

    async def version_keys(self) -> list[VersionKey]:
        out = []
        for meta in await self.store.list_objects(f"{self.prefix}/versions"):
            m = _VERSION_KEY.search(str(meta["path"]))
            if m:
                out.append(VersionKey(int(m.group(1)), int(m.group(2)), str(meta["path"])))
        return sorted(out, key=lambda v: (v.id, v.epoch))

    async def visible_versions(self) -> list[VersionKey]:
        """Manifests readers trust, oldest first: admitted by the lease's fences, one per id (the newest
        epoch's), ordered by (epoch, id). A newer epoch supersedes every older one: after a take-over
        the new holder's versions are the job's newest even if an old holder numbered its own higher."""
        lease = await self.read_lease()
        return _visible(await self.version_keys(), lease)

    async def summary(self) -> dict[str, Any] | None:
        """What the bucket holds of the job, for ``list --remote``: visible versions, the newest one's id and
        time, and the bytes of every object under the job (one listing, the lease, one manifest).
        ``None`` for a deleted job (a tombstone)."""
        objects = await self.store.list_objects(self.prefix)
        lease = await self.read_lease()
        if lease is not None and lease.deleted:
            return None
        keys = []
        for meta in objects:
            m = _VERSION_KEY.search(str(meta["path"]))
            if m and str(meta["path"]).startswith(f"{self.prefix}/versions/"):
                keys.append(VersionKey(int(m.group(1)), int(m.group(2)), str(meta["path"])))
        visible = _visible(keys, lease)
        newest_time = None
        if visible:
            with contextlib.suppress(CorruptVersion):
                newest_time = str((await self.read_manifest(visible[-1])).get("time"))
        return {"job": self.job, "owner": self.owner, "versions": len(visible),
                "latest": visible[-1].id if visible else None, "latest_time": newest_time,
                "bytes": sum(int(m["size"]) for m in objects)}

    async def put_manifest(self, version: int, epoch: int, raw: bytes) -> None:
        try:
            await self.store.put(self.version_key(version, epoch), raw, create=True)
        except FileExistsError:
            raise RemoteError(f"{self.job} version {version} (epoch {epoch}) is already in the bucket") from None

    async def read_manifest(self, vk: VersionKey) -> dict[str, Any]:
        where = f"{self.job} version {vk.id}"
        try:
            raw, _ = await self.store.get(vk.key)
        except FileNotFoundError:
            raise CorruptVersion(f"{where}: object {vk.key} is missing") from None
        doc = obj.open_record(bytes(raw), self.job, vk.id, f"object {vk.key}")
        if (doc.get("remote") or {}).get("epoch") != vk.epoch:
            raise CorruptVersion(f"{where}: the manifest names another epoch (object {vk.key})")
        return doc

    # -- versions --------------------------------------------------------------------------------

    async def load(self, vk: VersionKey, path: tuple[str | int, ...] = ()) -> RemoteLoaded:
        """Download and verify one version into memory: the whole of it, many requests in flight, or the
        subtree at ``path`` through the one reader (:mod:`.objects`), which for format 2 GETs only the
        pages on the path (O(log N)) and the chunks of the leaves below it. ``NotFound``: nothing there."""
        where = f"{self.job} version {vk.id}"
        doc = await self.read_manifest(vk)
        packed = set((doc.get("remote") or {}).get("packed") or ())
        if path:
            tree = await anyio.to_thread.run_sync(self.reader.load_path, doc, where, tuple(path), packed)
        else:  # every page at once, level by level, then every chunk, many requests in flight
            pages = await self._fetch_pages(doc, where) if doc.get("format") == paged.FORMAT else {}
            tree, blobs = self.reader.tree(doc, where, fetched=pages)
            await self._fetch_blobs(blobs, packed, where)
        return RemoteLoaded(info=obj.version_info(doc, self.job), tree=tree, sessions=obj.sessions_of(doc),
                            wal_lsn=int(doc.get("wal_lsn", 0)), doc=doc)

    async def _fetch_pages(self, doc: dict[str, Any], where: str,
                           skip: set[str] | None = None) -> dict[str, bytes]:
        """Every page of a format-2 version, verified by its name, level by level (``CONCURRENCY`` at a
        time); a missing or altered one is :class:`CorruptVersion`. Not below a page in ``skip`` (gc's
        marks: a subtree shared with a version marked before is fetched once per collection)."""
        root, _params = paged.check_root(doc, where)
        pages: dict[str, bytes] = {}
        seen = skip if skip is not None else set()
        level = [root] if root not in seen else []
        limiter = anyio.CapacityLimiter(CONCURRENCY)

        failures: list[BaseException] = []

        async def one(digest: str, into: dict[str, bytes], scope: anyio.CancelScope) -> None:
            async with limiter:
                key = self.chunk_key(digest)
                try:
                    try:
                        raw, _ = await self.store.get(key)
                    except FileNotFoundError:
                        raise obj.corrupt(where, "page", digest, "is missing", key) from None
                    obj.check_page(digest, bytes(raw), where, key)
                except (CorruptVersion, RemoteError) as exc:  # raised as itself, not in an exception group
                    failures.append(exc)
                    scope.cancel()
                    return
                into[digest] = bytes(raw)

        while level:
            got: dict[str, bytes] = {}
            async with anyio.create_task_group() as tg:
                for digest in level:
                    tg.start_soon(one, digest, got, tg.cancel_scope)
            if failures:
                raise failures[0]
            pages.update(got)
            children = {c for d, raw in got.items() for c in paged.page_links(raw, d, doc, where)[0]}
            level = sorted(children - pages.keys() - seen)
        return pages

    async def _fetch_blobs(self, blobs: list[Blob], packed: set[str], where: str) -> None:
        """Download and verify every chunk, ``CONCURRENCY`` at a time, into each blob's own writable,
        pre-faulted buffer (the downloaded bytes are read-only, and a restore returns writable arrays;
        faulting fresh pages one by one costs more than the copy). Buffers are made, and chunks hashed
        and copied, in worker threads, so all of it overlaps the downloads: a chunk is checked and copied
        in one pass in the thread, the moment it has arrived. The first failure cancels the rest and is
        raised as itself (not in an exception group)."""
        limiter = anyio.CapacityLimiter(CONCURRENCY)
        failures: list[BaseException] = []

        async def alloc(blob: Blob, ready: anyio.Event) -> None:
            blob.data = await anyio.to_thread.run_sync(_buffer, blob.nbytes)
            ready.set()

        async def one(chunk: Chunk, at: int, blob: Blob, ready: anyio.Event, scope: anyio.CancelScope) -> None:
            async with limiter:
                key = self.chunk_key(chunk.digest, chunk.digest in packed)
                try:
                    try:
                        data, _ = await self.store.get(key)
                    except FileNotFoundError:
                        raise obj.corrupt(where, "chunk", chunk.digest, "is missing", key) from None
                    await ready.wait()
                    assert blob.data is not None
                    await anyio.to_thread.run_sync(_verified, chunk, data, chunk.digest in packed, key, where,
                                                   blob.data[at : at + chunk.size])
                except (CorruptVersion, RemoteError) as exc:
                    failures.append(exc)
                    scope.cancel()

        async with anyio.create_task_group() as tg:
            for blob in blobs:
                assert blob.chunks is not None
                ready = anyio.Event()
                tg.start_soon(alloc, blob, ready)
                pos = 0
                for chunk in blob.chunks:
                    tg.start_soon(one, chunk, pos, blob, ready, tg.cancel_scope)
                    pos += chunk.size
        if failures:
            raise failures[0]

    async def load_version(self, version: int | None,
                           on_skip: Callable[[CorruptVersion], None] | None = None,
                           path: tuple[str | int, ...] = ()) -> RemoteLoaded | None:
        """``version`` by id (``NotFound``, or ``CorruptVersion`` when it fails to verify), or the newest
        version that verifies; corrupt newer ones are passed to ``on_skip`` and skipped. ``path``: only
        the subtree there (see :meth:`load`)."""
        visible = await self.visible_versions()
        if version is not None:
            for vk in visible:
                if vk.id == version:
                    return await self.load(vk, path)
            raise NotFound(f"job {self.job!r} has no version {version} in {self.store.describe()}")
        for vk in reversed(visible):
            try:
                return await self.load(vk, path)
            except CorruptVersion as exc:
                if on_skip is not None:
                    on_skip(exc)
        return None

    async def list_versions(self) -> list[VersionInfo]:
        """Every visible version's info (its manifest read, ``CONCURRENCY`` at a time; chunks not read)."""
        visible = await self.visible_versions()
        out: list[VersionInfo | None] = [None] * len(visible)
        limiter = anyio.CapacityLimiter(CONCURRENCY)

        async def one(i: int, vk: VersionKey) -> None:
            async with limiter:
                try:
                    doc = await self.read_manifest(vk)
                except CorruptVersion as exc:
                    out[i] = VersionInfo(self.job, vk.id, None, "", 0, "", {}, ok=False, error=str(exc))
                    return
            out[i] = obj.version_info(doc, self.job)

        async with anyio.create_task_group() as tg:
            for i, vk in enumerate(visible):
                tg.start_soon(one, i, vk)
        return [info for info in out if info is not None]

    async def seed(self, local: JobStore, on_skip: Callable[[CorruptVersion], None] | None = None,
                   version: int | None = None) -> int | None:
        """Copy the newest version that verifies (or ``version``: ``NotFound`` if the bucket lacks it,
        ``CorruptVersion`` if it does not verify) into the local store (a fresh host). Returns its id.

        Chunks stream from the bucket to chunk files, ``CONCURRENCY`` at a time, each verified in a worker
        thread and stored as it was uploaded (zstd ones stay compressed): memory holds a few chunks, never
        the state. Every chunk is written and fsynced, and its directory too, before the manifest, as a
        local save would; a version that fails to verify leaves only unreferenced chunk files (garbage
        for the next gc) and the next older one is tried."""
        lease = await self.read_lease()
        visible = _visible(await self.version_keys(), lease)
        if version is not None:
            picked = [vk for vk in visible if vk.id == version]
            if not picked:
                raise NotFound(f"job {self.job!r} has no version {version} in {self.store.describe()}")
        else:
            picked = list(reversed(visible))
        for vk in picked:
            try:
                await self._seed_version(local, vk)
                if lease is not None and lease.incarnation is not None and version is None:
                    # The seeded job goes on as the bucket's incarnation, not as a new one.
                    await anyio.to_thread.run_sync(write_incarnation, local, lease.incarnation)
                return vk.id
            except CorruptVersion as exc:
                if version is not None:
                    raise
                if on_skip is not None:
                    on_skip(exc)
        return None

    async def _seed_version(self, local: JobStore, vk: VersionKey) -> None:
        where = f"{self.job} version {vk.id}"
        doc = await self.read_manifest(vk)
        packed = set((doc.get("remote") or {}).get("packed") or ())
        # Pages are objects beside the chunks, copied the same way; the whole version must parse first.
        pages = await self._fetch_pages(doc, where) if doc.get("format") == paged.FORMAT else {}
        _tree, blobs = self.reader.tree(doc, where, fetched=pages)
        chunks = {d: Chunk(d, len(raw), prolly.PAGE_HASH) for d, raw in pages.items()}
        chunks.update({c.digest: c for blob in blobs for c in (blob.chunks or ())})
        await anyio.to_thread.run_sync(local.ensure_dirs)
        dirs: set[Path] = {local.objects_dir}
        limiter = anyio.CapacityLimiter(CONCURRENCY)
        failures: list[BaseException] = []

        async def one(chunk: Chunk, scope: anyio.CancelScope) -> None:
            target = local.object_path(chunk.digest)
            dirs.add(target.parent)  # a chunk already here may not have a durable name yet (defect 6)
            if await aiofiles.os.path.exists(target) or await aiofiles.os.path.exists(
                    local.object_path(chunk.digest, True)):
                return
            is_packed = chunk.digest in packed
            key = self.chunk_key(chunk.digest, is_packed)
            async with limiter:
                try:
                    try:
                        data, _ = await self.store.get(key)
                    except FileNotFoundError:
                        raise obj.corrupt(where, "chunk", chunk.digest, "is missing", key) from None
                    await anyio.to_thread.run_sync(_verified, chunk, data, is_packed, key, where, None)
                    # Stored as uploaded (zstd stays zstd), durably: temp, fsync, rename through fileops.
                    await anyio.to_thread.run_sync(local.objects.put, obj.object_name(chunk.digest, is_packed), data)
                except (CorruptVersion, RemoteError, OSError) as exc:
                    failures.append(exc)
                    scope.cancel()

        async with anyio.create_task_group() as tg:
            for chunk in chunks.values():
                tg.start_soon(one, chunk, tg.cancel_scope)
        if failures:
            raise failures[0]
        for d in dirs:
            await anyio.to_thread.run_sync(fsync_dir, d)
        raw = seal({k: v for k, v in doc.items() if k != "remote"})
        await anyio.to_thread.run_sync(
            lambda: atomic_write(local.versions_dir / f"{vk.id:012d}.json", raw, local.tmp_dir))

    async def newest_replicated(self, local: JobStore, local_ids: Sequence[int]) -> int | None:
        """The newest of ``local_ids`` the bucket has: the same manifest, not just the same id (another
        host may have published its own version under that id). Uploads go in order, so every local
        version up to it is in the bucket too (or was retired there by remote retention), and every one
        after it is not."""
        visible = await self.visible_versions()
        local_set = set(local_ids)
        for vk in reversed(visible[-8:]):  # the newest few suffice: uploads go in order
            if vk.id not in local_set:
                continue
            try:
                remote_doc = await self.read_manifest(vk)
            except CorruptVersion:
                continue
            remote_doc.pop("remote", None)
            path = local.versions_dir / f"{vk.id:012d}.json"
            try:
                async with aiofiles.open(path, "rb") as fh:
                    local_doc = unseal(await fh.read(), f"{local.job} version {vk.id}")
            except (FileNotFoundError, CorruptVersion):
                continue
            if local_doc == remote_doc:
                return vk.id
        return None

    # -- lease -----------------------------------------------------------------------------------

    @property
    def lease_key(self) -> str:
        return f"{self.prefix}/lease.json"

    async def read_lease(self) -> Lease | None:
        try:
            raw, etag = await self.store.get(self.lease_key)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(bytes(raw))
            incarnation = doc.get("incarnation")
            return Lease(holder=str(doc["holder"]), epoch=int(doc["epoch"]), expires=float(doc["expires"]),
                         fences={str(k): int(v) for k, v in dict(doc.get("fences") or {}).items()}, etag=etag,
                         incarnation=None if incarnation is None else str(incarnation),
                         deleted=bool(doc.get("deleted", False)))
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteError(f"{self.job}: lease object {self.lease_key} is unreadable ({exc})") from None

    async def acquire(self, holder: str, ttl: float, *, take_over: bool = False,
                      incarnation: str | None = None) -> Lease:
        """Become the job's one publisher with a new epoch. Refused (:class:`LeaseHeld`) while another
        holder's lease is live, unless ``take_over`` (the operator knows the old host is gone), which
        retries while the holder renews concurrently (its compare-and-swap then beats ours).

        ``incarnation``: the publishing job's incarnation (``None``: keep the lease's, as a take-over by
        the operator does). After a tombstone, or over another incarnation, the new lease starts with no
        fences: nothing the older incarnation published is read again, and remote gc removes it."""
        for attempt in range(10 if take_over else 1):
            try:
                return await self._acquire_once(holder, ttl, take_over, incarnation)
            except LeaseHeld as exc:
                if not take_over or "changed while taking it" not in str(exc) or attempt == 9:
                    raise
                await anyio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _acquire_once(self, holder: str, ttl: float, take_over: bool, incarnation: str | None) -> Lease:
        now = time.time()
        current = await self.read_lease()
        if current is None:
            lease = Lease(holder=holder, epoch=1, expires=now + ttl, fences={}, incarnation=incarnation)
            try:
                lease.etag = await self.store.put(self.lease_key, _dump(lease.doc()), create=True)
            except FileExistsError:
                raise LeaseHeld(f"{self.job}: another daemon took the lease just now") from None
            return lease
        if current.holder != holder and current.expires > now and not take_over:
            raise LeaseHeld(f"{self.job}: the lease is held by {current.holder} (epoch {current.epoch}) for "
                            f"{current.expires - now:.0f}s more; publishing waits for it to expire "
                            "(or run `autosaved remote takeover`)")
        if incarnation is None:  # the operator's take-over: the same incarnation (or tombstone) goes on
            incarnation, deleted, fresh = current.incarnation, current.deleted, False
        else:
            deleted = False
            fresh = current.deleted or current.incarnation not in (None, incarnation)
        fences: dict[str, int] = {}
        if not fresh:
            fences = dict(current.fences)
            # Whatever the old epoch published up to now stays readable; nothing it publishes later does.
            seen = [vk.id for vk in await self.version_keys() if vk.epoch == current.epoch]
            fences[str(current.epoch)] = max(seen, default=0)
        lease = Lease(holder=holder, epoch=current.epoch + 1, expires=now + ttl, fences=fences,
                      incarnation=incarnation, deleted=deleted,
                      replaced=current.incarnation if fresh and not current.deleted else None)
        try:
            lease.etag = await self.store.put(self.lease_key, _dump(lease.doc()), if_match=current.etag)
        except _PreconditionFailed:
            raise LeaseHeld(f"{self.job}: the lease changed while taking it; will retry") from None
        return lease

    async def renew(self, lease: Lease, ttl: float) -> None:
        """Extend ``lease`` by compare-and-swap; :class:`Fenced` if anyone else wrote the lease since."""
        new = Lease(holder=lease.holder, epoch=lease.epoch, expires=time.time() + ttl, fences=lease.fences,
                    incarnation=lease.incarnation, deleted=lease.deleted)
        try:
            etag = await self.store.put(self.lease_key, _dump(new.doc()), if_match=lease.etag)
        except _PreconditionFailed:
            other = await self.read_lease()
            if other is not None and other.holder == lease.holder and other.epoch == lease.epoch:
                lease.etag, lease.expires = other.etag, other.expires  # our own write whose reply was lost
                return
            if other is not None and other.deleted:
                raise Fenced(f"{self.job}: the job was deleted from the bucket by {other.holder}; this daemon no "
                             "longer publishes versions of this job") from None
            who = f"{other.holder} (epoch {other.epoch})" if other else "nobody (deleted)"
            raise Fenced(f"{self.job}: the lease was taken over by {who}; this daemon no longer publishes "
                         "versions of this job") from None
        lease.etag, lease.expires = etag, new.expires

    # -- delete ------------------------------------------------------------------------------------

    async def delete_job(self, holder: str) -> tuple[int, int]:
        """Delete the job from the bucket: first a tombstone lease (a new epoch marked ``deleted``: from
        then on no reader, seed or restore sees any version of it, and a live publisher is fenced at its
        next renewal), then every other object under the job. Returns (objects, bytes) removed. A job
        recreated later publishes as a new incarnation over the tombstone."""
        found = [m for m in await self.store.list_objects(self.prefix) if str(m["path"]) != self.lease_key]
        for attempt in range(10):
            current = await self.read_lease()
            if current is None and not found:
                return 0, 0  # nothing of the job here, not even a lease: no tombstone needed
            if current is not None and current.deleted:
                break
            tomb = Lease(holder=holder, epoch=(current.epoch if current else 0) + 1, expires=0.0, fences={},
                         deleted=True)
            try:
                if current is None:
                    await self.store.put(self.lease_key, _dump(tomb.doc()), create=True)
                else:
                    await self.store.put(self.lease_key, _dump(tomb.doc()), if_match=current.etag)
                break
            except (FileExistsError, _PreconditionFailed):
                await anyio.sleep(0.05 * (attempt + 1))  # a publisher renewed just now: read it again
        else:
            raise RemoteError(f"{self.job}: the lease kept changing while deleting the job; try again")
        # Listed after the tombstone: whatever was written before it goes; nothing written after is read.
        doomed = [m for m in await self.store.list_objects(self.prefix) if str(m["path"]) != self.lease_key]
        await self.store.delete([str(m["path"]) for m in doomed])
        return len(doomed), sum(int(m["size"]) for m in doomed)

    # -- retention and garbage collection ---------------------------------------------------------

    @property
    def gc_key(self) -> str:
        return f"{self.prefix}/gc.json"

    async def collect(self, *, keep_last: int, keep_every: float | None, grace: float,
                      protect: frozenset[int] = frozenset(), now: float | None = None,
                      lease: Lease | None = None, ttl: float = 30.0) -> RemoteGc:
        """Retention then garbage collection; run by the lease holder only. Manifests go first. A chunk
        goes only when no manifest references it, it is older than ``grace``, and it was already seen
        unreferenced by a collection at least ``grace`` ago: an upload (chunks before its manifest) or a
        restore (manifest read, chunks being fetched) younger than ``grace`` keeps everything it needs.
        With ``lease`` (the daemon's), it is renewed before anything is deleted: a holder that lost the
        lease deletes nothing (:class:`Fenced`)."""
        now = time.time() if now is None else now
        result = RemoteGc()
        # One listing for every decision below: a manifest published after it is never touched.
        all_keys = await self.version_keys()
        visible = _visible(all_keys, await self.read_lease())
        # Retention works on positions in reading order ((epoch, id), see visible_versions), not raw ids.
        times: list[tuple[int, float | None]] = []
        docs: dict[str, dict[str, Any]] = {}
        newest_ok = None
        for pos, vk in enumerate(visible):
            try:
                docs[vk.key] = await self.read_manifest(vk)
                times.append((pos, _iso_time(docs[vk.key].get("time"))))
                newest_ok = pos
            except CorruptVersion:
                times.append((pos, None))
        keep = {pos for pos, vk in enumerate(visible) if vk.id in protect}
        keep |= {newest_ok} if newest_ok is not None else set()
        doomed_pos = versions_to_delete(times, keep_last=keep_last, keep_every=keep_every, protect=frozenset(keep))
        doomed = {visible[pos].key for pos in doomed_pos}
        shown = {vk.key for vk in visible}
        # Manifests no reader trusts (fenced off, or superseded by a newer epoch's of the same id) go too.
        drop = [vk for vk in all_keys if vk.key in doomed or vk.key not in shown]
        if lease is not None:
            await self.renew(lease, ttl)
        await self.store.delete([vk.key for vk in drop])
        result.deleted_versions = sorted({vk.id for vk in drop if vk.key in doomed})
        refs: set[str] = set()
        for vk in await self.version_keys():
            try:
                doc = docs.get(vk.key) or await self.read_manifest(vk)
            except CorruptVersion:
                return result  # never collect while a manifest is unreadable: it may reference anything
            if doc.get("format") == paged.FORMAT:
                try:  # a format-2 version's pages and the chunks its leaves name, marked subtrees skipped
                    pages = await self._fetch_pages(doc, f"{self.job} version {vk.id}", refs)
                except CorruptVersion:
                    return result
                for digest, page in pages.items():
                    refs.add(digest)
                    refs.update(paged.page_links(page, digest, doc, f"{self.job} version {vk.id}")[1])
                continue
            for rec in doc["blobs"]:
                refs.update(str(d) for d, _ in rec["chunks"])
        try:
            raw, _ = await self.store.get(self.gc_key)
            pending = {str(k): float(v) for k, v in json.loads(bytes(raw)).items()}
        except (FileNotFoundError, ValueError, AttributeError):
            pending = {}
        sizes: dict[str, int] = {}
        index = await self.chunk_index(sizes)  # one listing of every object, not one per use
        gone = []
        new_pending = {}
        for digest, (key, modified) in index.items():
            if digest in refs:
                continue
            since = pending.get(digest, now)
            if now - since >= grace and now - modified >= grace:
                gone.append(key)
                result.freed_bytes += sizes.get(key, 0)
            else:
                new_pending[digest] = since
        await self.store.delete(gone)
        result.removed_chunks = len(gone)
        await self.store.put(self.gc_key, _dump(new_pending))
        return result


def _verified(chunk: Chunk, data: memoryview, packed: bool, key: str, where: str,
              into: memoryview | None) -> bytes | memoryview:
    """``data`` checked as ``chunk`` (:func:`.objects.check_chunk`), copied into ``into`` when given.
    Runs in a worker thread."""
    raw = obj.check_chunk(chunk, data, packed, where, key)
    if into is not None:
        # numpy's copy releases the GIL (a memoryview slice assignment would hold it for the whole copy).
        np.copyto(np.frombuffer(into, dtype=np.uint8), np.frombuffer(raw, dtype=np.uint8))
    return raw


def _buffer(nbytes: int) -> memoryview:
    if nbytes < 1 << 20:
        return memoryview(bytearray(nbytes))
    populate = getattr(mmap, "MAP_POPULATE", 0)
    return memoryview(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate))


def _visible(keys: list[VersionKey], lease: Lease | None) -> list[VersionKey]:
    best: dict[int, VersionKey] = {}
    for vk in sorted(keys, key=lambda v: (v.id, v.epoch)):  # the newest epoch of an id wins
        if lease is None or lease.admits(vk):
            best[vk.id] = vk
    return sorted(best.values(), key=lambda v: (v.epoch, v.id))


def _iso_time(value: Any) -> float | None:
    from datetime import datetime
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True).encode()


def remote_manifest(local_raw: bytes, epoch: int, holder: str, packed: Sequence[str], where: str,
                    incarnation: str | None = None) -> bytes:
    """The bucket's manifest of a local version: the local manifest plus who published it, at which epoch,
    of which job incarnation, and which chunks are stored compressed (their object names end in ``.zst``)."""
    doc = unseal(local_raw, where)
    doc["remote"] = {"epoch": epoch, "holder": holder, "packed": sorted(packed)}
    if incarnation is not None:
        doc["remote"]["incarnation"] = incarnation
    return seal(doc)


# A job's incarnation on this host: a random id, made when the job first publishes (or copied from the
# bucket's lease when the job is seeded from there). It lives in the job's folder, so it goes with `delete`:
# a job recreated under the same name is a new incarnation and never mistaken for the deleted one.
INCARNATION_FILE = "incarnation"


def read_incarnation(local: JobStore) -> str | None:
    try:
        text = (local.path / INCARNATION_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def write_incarnation(local: JobStore, incarnation: str) -> None:
    # No ensure_dirs: a job deleted meanwhile must not get its folder back (the write fails instead).
    atomic_write(local.path / INCARNATION_FILE, incarnation.encode() + b"\n", local.tmp_dir)


def ensure_incarnation(local: JobStore) -> str:
    """The job's incarnation here, made (durably) on first use. Runs in a worker thread."""
    found = read_incarnation(local)
    if found is not None:
        return found
    made = secrets.token_hex(8)
    write_incarnation(local, made)
    return made


def open_remote(url: str, *, endpoint: str | None = None, region: str | None = None,
                credentials_file: Path | None = None) -> RemoteStore:
    creds = read_credentials_file(credentials_file) if credentials_file is not None else None
    return RemoteStore(url, endpoint=endpoint, region=region, credentials=creds)


def holder_id(state_dir: Path) -> str:
    """Who holds a lease: this host and state dir (a restarted daemon on the same dir is the same holder)."""
    import socket
    return f"{socket.gethostname()}:{state_dir}"


__all__ = ["Fenced", "Lease", "LeaseHeld", "RemoteError", "RemoteJob", "RemoteLoaded", "RemoteStore", "VersionKey",
           "ensure_incarnation", "open_remote", "parse_url", "read_incarnation", "remote_manifest",
           "write_incarnation"]
