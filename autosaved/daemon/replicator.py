"""Replication: every committed local version goes to the object store, in order, none skipped.

One task per job with a remote (started on the daemon's task group). It holds the job's lease, uploads the
chunks the bucket lacks (read from the local chunk files with ``aiofiles``, sent with obstore's async
API, so a slow network parks no worker thread), renews the lease, then writes the manifest. A failure is
retried with exponential backoff and reported (``status``: newest replicated version, backlog, last
error); it never blocks the trainer or local saves. Local retention keeps every version still to upload
(:meth:`Replicator.protect`), so a store that is down for a while is a backlog, never a gap.

The replicator gets narrow callables, not the daemon: where a job's local store is, the retention
settings, and an event-loop task spawner.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from ..backoff import backoff
from ..config import RemoteSettings
from ..errors import AutosavedError, CorruptVersion, NotFound, StorageError
from ..storage.fsutil import atomic_write, make_dirs
from ..storage.local import JobStore
from ..storage.manifest import VersionInfo
from ..storage.remote import (
    ConditionalWritesIgnored,
    Fenced,
    Lease,
    LeaseHeld,
    RemoteError,
    RemoteJob,
    RemoteStore,
    ensure_incarnation,
)
from ..storage.upload import upload_version
from ..throttle import Load, initial_state, measure_net, step, upload_controller
from .jobs import JobKey
from .netsampler import NetSampler, endpoint_address

log = logging.getLogger("autosaved.replicator")

# Until an upload was measured, a deadline flush plans uploads at this rate (a modest cloud link's share).
DEFAULT_UPLOAD_SPEED = 32 * 1024 * 1024
SPEED_SAMPLE_MIN = 4 * 1024 * 1024
MAX_BACKOFF = 30.0
FIRST_BACKOFF = 0.5


@dataclass
class Replica:
    """What the replicator knows about one job."""

    key: JobKey
    remote: RemoteJob
    local: JobStore
    queue: list[int] = field(default_factory=list)  # committed local versions not yet in the bucket, ascending
    queued_bytes: dict[int, int] = field(default_factory=dict)
    replicated: int | None = None
    replicated_at: float | None = None
    last_error: str | None = None
    fenced: str | None = None
    lease: Lease | None = None
    known: dict[str, str] | None = None  # digest → object key, of chunks the bucket has
    complete: set[str] = field(default_factory=set)  # pages whose whole subtree the bucket has (with known)
    waiters: list[tuple[int, anyio.Event]] = field(default_factory=list)
    wake: anyio.Event = field(default_factory=anyio.Event)
    gone: str | None = None  # the job was deleted: this record is dropped and its task cancelled
    scope: anyio.CancelScope | None = None
    bytes_uploaded: int = 0
    chunks_uploaded: int = 0
    versions_uploaded: int = 0
    last_gc: float = 0.0

    @property
    def backlog_bytes(self) -> int:
        """Bytes still to upload of the queued versions (estimated until each upload counts them)."""
        return sum(self.queued_bytes.get(v, 0) for v in self.queue)

    def status(self) -> dict[str, Any]:
        return {
            "replicated_version": self.replicated,
            "replicated_at": self.replicated_at,  # unix time the newest replicated version reached the bucket
            "backlog_versions": len(self.queue),
            "backlog_bytes": self.backlog_bytes,
            "last_error": self.last_error,
            "fenced": self.fenced,
            "lease_epoch": self.lease.epoch if self.lease else None,
            "bytes_uploaded": self.bytes_uploaded,
            "chunks_uploaded": self.chunks_uploaded,
            "versions_uploaded": self.versions_uploaded,
        }


class UploadThrottle:
    """How fast uploads may send: ``[remote] upload_rate`` as the ceiling and, under it (with ``[throttle]
    enabled``), the rate the network controller allows (:func:`~autosaved.throttle.step` on
    :func:`~autosaved.throttle.measure_net`). Paces on the event loop: a chunk waits for its slot, no thread
    is held."""

    def __init__(self, cap: int | None, *, adaptive: bool) -> None:
        self.ctl = upload_controller(None if cap is None else float(cap))
        self.state = initial_state(self.ctl)
        self.adaptive = adaptive
        self.load = Load()
        self.bypass = False  # deadline flush: the adaptive rate no longer applies (the cap still does)
        self.sent = 0  # counted when a chunk is let go, before the interface sees it: never "others'" bytes
        self.throttled_s = 0.0
        self.interfaces: list[str] = []
        self._free_at = 0.0

    @property
    def rate(self) -> float:
        return self.state.rate if self.adaptive and not self.bypass else self.ctl.ceiling

    async def __call__(self, nbytes: int) -> None:
        self.sent += nbytes
        rate = self.rate
        if math.isinf(rate):
            return
        now = time.monotonic()
        start = max(now, self._free_at)
        self._free_at = start + nbytes / rate
        if start > now:
            self.throttled_s += start - now
            await anyio.sleep(start - now)

    def reconfigure(self, cap: int | None, *, adaptive: bool) -> None:
        """A reloaded ``upload_rate`` / ``[throttle] enabled``: the new ceiling, the current rate held to it."""
        self.ctl = upload_controller(None if cap is None else float(cap))
        self.adaptive = adaptive
        self.state = replace(self.state, rate=min(self.state.rate, self.ctl.ceiling)) if adaptive \
            else initial_state(self.ctl)

    def observe(self, load: Load, now: float) -> None:
        self.load = load
        if self.adaptive:
            self.state = step(self.ctl, self.state, load, now)

    async def run(self, endpoint: str | None, interval: float) -> None:
        """Sample the network every ``interval`` seconds and steer the rate (forever). A failure to read
        the counters is logged and the loop goes on: the cap still holds."""
        address = await anyio.to_thread.run_sync(endpoint_address, endpoint)
        sampler = NetSampler(address, lambda: self.sent, time.monotonic)
        self.interfaces = sampler.interfaces
        prev = sampler.sample()
        while True:
            await anyio.sleep(interval)
            try:
                cur = sampler.sample()
            except Exception:  # a counter file in an unexpected shape: not worth the replicator
                log.exception("could not sample the network counters")
                continue
            before = self.rate
            self.observe(measure_net(prev, cur), cur.at)
            prev = cur
            if self.rate != before and (math.isinf(before) or math.isinf(self.rate)
                                        or abs(self.rate - before) > 0.25 * before):
                log.debug("upload rate %s (util=%s others=%s loss=%s)",
                          "unlimited" if math.isinf(self.rate) else f"{self.rate / 2**20:.1f} MiB/s",
                          self.load.utilisation, self.load.others_bps, self.load.loss)

    def status(self) -> dict[str, Any]:
        return {"adaptive": self.adaptive, "allowed_rate": None if math.isinf(self.rate) else round(self.rate),
                "cap": None if math.isinf(self.ctl.ceiling) else round(self.ctl.ceiling),
                "contended": self.state.contended, "interfaces": self.interfaces,
                "utilisation": None if self.load.utilisation is None else round(self.load.utilisation, 3),
                "others_bps": None if self.load.others_bps is None else round(self.load.others_bps),
                "loss": None if self.load.loss is None else round(self.load.loss, 4),
                "throttled_s": round(self.throttled_s, 3)}


class Replicator:
    def __init__(self, settings: RemoteSettings, *, holder: str, local_store: Callable[[int, str], JobStore],
                 retention: Callable[[JobKey], tuple[int, float | None]],
                 spawn: Callable[..., None],
                 store: RemoteStore | None = None, adaptive: bool = True,
                 pending_dir: Path | None = None) -> None:
        from ..storage.remote import open_remote

        assert settings.url is not None
        self.settings = settings
        self.holder = holder
        self.store = store or open_remote(settings.url, endpoint=settings.endpoint, region=settings.region,
                                          credentials_file=settings.credentials_file)
        self.store.timeout = settings.timeout
        self.local_store = local_store
        self.retention = retention
        self.spawn = spawn
        self.replicas: dict[JobKey, Replica] = {}
        self.rate = UploadThrottle(settings.upload_rate, adaptive=adaptive)
        self.probed = anyio.Event()
        self.refused: str | None = None
        self.last_probe_error: str | None = None
        self.stopping = False
        self.catch_ups = anyio.CapacityLimiter(8)
        # Bytes/s uploads reached when not held back (moving average); None until measured.
        self.upload_speed: float | None = None
        # Daemon-wide counters for the metrics endpoint: they outlive a forgotten (deleted) job's record.
        self.bytes_uploaded = 0
        self.upload_errors = 0  # failed catch-ups, uploads and lease renewals (each retry counts)
        # Deleted jobs whose objects in the bucket are still to delete: a record per job under
        # ``pending_dir`` (written before the local folder goes, so a crash never forgets one), and an
        # event set once the bucket is rid of them. Until then nothing of the job is read from the bucket
        # (no seed, no pull) and a recreated job publishes nothing.
        self.pending_dir = pending_dir
        self.deleting: dict[JobKey, anyio.Event] = {key: anyio.Event() for key in self._pending_records()}
        self._completing: set[JobKey] = set()
        self._begun: set[JobKey] = set()  # deletes begun by a request still in flight with no earlier one pending

    def reconfigure(self, new: RemoteSettings, *, adaptive: bool) -> None:
        """A config reload: retention, lease, grace, timeout and the upload rate apply at once; where the
        store is (url, endpoint, region, credentials) only at the next start (jobs hold leases there)."""
        where = ("url", "endpoint", "region", "credentials_file")
        if any(getattr(new, k) != getattr(self.settings, k) for k in where):
            log.warning("config reload: [remote] url, endpoint, region and credentials_file take effect at the "
                        "next start; replicating on to %s", self.store.describe())
            new = replace(new, **{k: getattr(self.settings, k) for k in where})
        self.settings = new
        self.store.timeout = new.timeout
        self.rate.reconfigure(new.upload_rate, adaptive=adaptive)

    # -- start ------------------------------------------------------------------------------------

    async def probe(self, timeout: float) -> bool:
        """Check the store honours ``If-None-Match: *``. A definite "no" refuses the store (raised: the
        daemon does not start with it); ``False``: not reachable now (then run :meth:`probe_later`)."""
        if not await self._probe_once(timeout):
            log.warning("object store %s not reachable at start (%s); replication waits for it",
                        self.store.describe(), self.last_probe_error)
            return False
        log.info("object store %s honours conditional writes; replicating there", self.store.describe())
        return True

    async def probe_later(self) -> None:
        """Probe with backoff until the store answers (then replication starts) or refuses."""
        attempt = 0
        while True:
            await anyio.sleep(backoff(attempt, base=FIRST_BACKOFF, cap=MAX_BACKOFF))
            try:
                if await self._probe_once(self.settings.timeout):
                    return
            except ConditionalWritesIgnored as exc:
                log.error("%s", exc)
                return
            attempt += 1

    async def _probe_once(self, timeout: float) -> bool:
        """One probe: ``True`` when the store honours conditional writes (``probed`` is set), ``False``
        when it could not be reached (``last_probe_error`` says why); a store that ignores them is
        recorded in ``refused`` and raised (:class:`ConditionalWritesIgnored`)."""
        try:
            with anyio.fail_after(timeout):
                await self.store.probe()
        except ConditionalWritesIgnored as exc:
            self.refused = str(exc)
            raise
        except (RemoteError, TimeoutError) as exc:
            self.last_probe_error = str(exc) or "the object store did not answer the probe in time"
            return False
        self.last_probe_error = None
        self.probed.set()
        return True

    # -- seams the daemon calls ---------------------------------------------------------------------

    def attach(self, owner: int, name: str, local_ids: list[int]) -> Replica:
        """Start replicating a job the daemon just loaded; ``local_ids`` are its committed local versions
        (the ones newer than the bucket's newest are queued once the bucket has been looked at)."""
        key = (owner, name)
        replica = self.replicas.get(key)
        if replica is None:
            replica = Replica(key=key, remote=self.store.job(owner, name), local=self.local_store(owner, name))
            # Until the bucket has been looked at, every local version counts as not uploaded, so local
            # retention keeps them all (the catch-up trims this to what the bucket lacks).
            replica.queue = sorted(local_ids)
            self.replicas[key] = replica
            self.spawn("replica", self._run, replica, list(local_ids))
        return replica

    def committed(self, owner: int, name: str, version: int, new_bytes: int = 0) -> None:
        """A local version was committed: queue it (the daemon's on-commit callback). ``new_bytes``, what
        the local save wrote, estimates what the bucket lacks until the upload counts it exactly."""
        replica = self.replicas.get((owner, name))
        if replica is None:
            return
        if version not in replica.queue and (replica.replicated is None or version > replica.replicated):
            replica.queue.append(version)
            replica.queue.sort()
            replica.queued_bytes[version] = new_bytes
        replica.wake.set()

    def protect(self, key: JobKey) -> set[int]:
        """Local versions retention must keep: those still to upload."""
        replica = self.replicas.get(key)
        return set(replica.queue) if replica is not None else set()

    def unreplicated(self, owner: int, name: str, local_ids: list[int]) -> set[int]:
        """What ``autosaved gc`` must keep of a job, loaded or not: it is attached here if it was not (a
        job not loaded since a restart may still have a backlog, which this then uploads), and until its
        first look at the bucket every local version counts as not uploaded."""
        return self.protect(self.attach(owner, name, local_ids).key)

    async def seed(self, owner: int, name: str, local: JobStore) -> int | None:
        """A job with no local version: copy the bucket's newest verified version in (a fresh host).
        Failures are logged and the job starts empty, as it would without a remote."""
        if self.refused:
            return None
        if self._deleting((owner, name)):
            log.info("job=%s owner=%d was deleted and its bucket copy is being deleted: not loaded from %s",
                     name, owner, self.store.describe())
            return None
        if not self.probed.is_set():
            log.error("job=%s has no local version and the object store %s is not reachable: it starts from "
                      "what this host has (nothing); its replicated versions stay in the bucket", name,
                      self.store.describe())
            return None
        try:
            # Each request to the store is bounded by [remote] timeout; a large state simply takes a while.
            version = await self.store.job(owner, name).seed(
                local, on_skip=lambda exc: log.warning("skipping corrupt remote version: %s", exc))
        except (RemoteError, CorruptVersion, OSError) as exc:
            log.error("could not load job=%s from %s: %s", name, self.store.describe(), exc)
            return None
        if version is not None:
            log.info("loaded job=%s owner=%d version=%d from %s", name, owner, version, self.store.describe())
        return version

    async def in_bucket(self, owner: int, name: str) -> bool:
        """Whether the bucket has a version of a job this host has nothing of (a fresh host's read asks
        before it says "no such job"). An unreachable store counts as "no", logged."""
        if self.refused or not self.probed.is_set() or self._deleting((owner, name)):
            return False
        try:
            # Bounded tighter than a store request: a status or list of an unknown job stays quick.
            with anyio.fail_after(min(2.0, self.settings.timeout)):
                return bool(await self.store.job(owner, name).visible_versions())
        except (RemoteError, TimeoutError) as exc:
            log.warning("could not look for job=%s in %s: %s", name, self.store.describe(), exc or "timed out")
            return False

    async def pull(self, owner: int, name: str, version: int, local: JobStore) -> None:
        """Copy version ``version`` from the bucket into the local store (a restore by id of a version this
        host lacks). ``NotFound`` if the bucket lacks it too, ``CorruptVersion`` if it does not verify,
        :class:`RemoteError` when the store cannot be read."""
        if self._deleting((owner, name)):
            raise NotFound(f"job {name!r} was deleted; its copy in {self.store.describe()} is being deleted")
        if self.refused or not self.probed.is_set():
            raise RemoteError(f"the object store {self.store.describe()} is not reachable: version {version} of "
                              f"job {name!r} is not on this host")
        await self.store.job(owner, name).seed(local, version=version)
        log.info("pulled job=%s owner=%d version=%d from %s", name, owner, version, self.store.describe())

    async def bucket_versions(self, owner: int, name: str) -> tuple[list[VersionInfo], str | None]:
        """The job's versions in the bucket (manifests read, chunks not), or the error that prevented it."""
        if self._deleting((owner, name)):
            return [], None  # deleted: what the bucket still holds of it is on its way out
        if self.refused or not self.probed.is_set():
            return [], self.refused or self.last_probe_error or "the object store is not reachable"
        try:
            # list is a short request for clients: the bucket's rows are left out (and the error said) rather
            # than the reply delayed past the client's timeout.
            with anyio.fail_after(min(3.0, self.settings.timeout)):
                return await self.store.job(owner, name).list_versions(), None
        except (RemoteError, TimeoutError) as exc:
            return [], str(exc) or "the object store did not answer in time"

    # -- delete ----------------------------------------------------------------------------------------

    def _deleting(self, key: JobKey) -> bool:
        event = self.deleting.get(key)
        return event is not None and not event.is_set()

    def _record_path(self, key: JobKey) -> Path:
        assert self.pending_dir is not None
        return self.pending_dir / str(key[0]) / key[1]

    def _pending_records(self) -> list[JobKey]:
        """The deletes a previous run left for the bucket (read once, at start: O(pending deletes))."""
        out: list[JobKey] = []
        if self.pending_dir is None or not self.pending_dir.is_dir():
            return out
        for owner in os.listdir(self.pending_dir):
            d = self.pending_dir / owner
            if owner.isdigit() and d.is_dir():
                out += [(int(owner), name) for name in os.listdir(d) if not name.startswith(".")]
        return out

    def forget(self, key: JobKey, why: str) -> None:
        """Drop the job's replica record (its replicated version, queue, lease) and stop its task: a job
        recreated under the name starts from nothing, so no ack can ever lean on the deleted one's."""
        replica = self.replicas.pop(key, None)
        if replica is None:
            return
        replica.gone = why
        for _, event in replica.waiters:
            event.set()
        replica.waiters.clear()
        if replica.scope is not None:
            replica.scope.cancel()

    async def begin_delete(self, owner: int, name: str) -> None:
        """Before a job's local folder goes: durably note that its bucket copy is to be deleted (so a crash
        never forgets it, and nothing re-seeds the job meanwhile) and forget its replica record."""
        key = (owner, name)
        if self.pending_dir is not None:
            path = self._record_path(key)
            doc = json.dumps({"owner": owner, "job": name, "since": time.time()}).encode()

            def write() -> None:
                make_dirs(path.parent)
                atomic_write(path, doc, path.parent)

            await anyio.to_thread.run_sync(write)
        if not self._deleting(key):
            self.deleting[key] = anyio.Event()
            self._begun.add(key)
        self.forget(key, f"job {name!r} was deleted")

    async def cancel_delete(self, owner: int, name: str, local_ids: list[int]) -> None:
        """The local delete failed: the job goes on (its record is removed and it replicates again)."""
        key = (owner, name)
        if key in self._begun:  # an earlier delete still pending stays pending
            self._begun.discard(key)
            await self._done_delete(key)
        if local_ids:
            self.attach(owner, name, local_ids)

    async def _done_delete(self, key: JobKey) -> None:
        if self.pending_dir is not None:
            await anyio.to_thread.run_sync(lambda: self._record_path(key).unlink(missing_ok=True))
        event = self.deleting.pop(key, None)
        if event is not None:
            event.set()

    async def finish_delete(self, owner: int, name: str) -> dict[str, Any]:
        """Delete the job's objects in the bucket now, within twice ``[remote] timeout`` (at most 10 s);
        if the bucket cannot be reached (or is slower), the delete stays pending here and completes in
        the background. Returns what happened there, for the client."""
        key = (owner, name)
        self._begun.discard(key)
        out: dict[str, Any] = {"url": self.store.location.url}
        if self.probed.is_set() and not self.refused:
            try:
                # Bounded for the client: a job with many objects, or a hanging store, finishes in the
                # background (once the tombstone is there, nothing reads the job anyway).
                with anyio.fail_after(min(2 * self.settings.timeout, 10.0)):
                    objects, nbytes = await self.store.job(owner, name).delete_job(self.holder)
            except (RemoteError, TimeoutError, OSError) as exc:
                out["error"] = str(exc) or "the object store did not answer in time"
            else:
                await self._done_delete(key)
                log.info("deleted job=%s owner=%d from %s objects=%d bytes=%d", name, owner, self.store.describe(),
                         objects, nbytes)
                return {**out, "state": "deleted", "objects": objects, "bytes": nbytes}
        else:
            out["error"] = self.refused or self.last_probe_error or "the object store is not reachable"
        log.warning("job=%s owner=%d deleted here; deleting it from %s is pending (%s)", name, owner,
                    self.store.describe(), out["error"])
        self._complete_later(key)
        return {**out, "state": "pending"}

    def resume_deletes(self) -> None:
        """At start: complete the bucket deletes a previous run left pending."""
        for key in list(self.deleting):
            self._complete_later(key)

    def _complete_later(self, key: JobKey) -> None:
        if key not in self._completing:
            self._completing.add(key)
            self.spawn("remotedelete", self._complete, key)

    async def _complete(self, key: JobKey) -> None:
        attempt = 0
        try:
            while self._deleting(key):
                await self.probed.wait()
                try:
                    with anyio.fail_after(2 * self.settings.timeout):
                        objects, nbytes = await self.store.job(*key).delete_job(self.holder)
                except (RemoteError, TimeoutError, OSError) as exc:
                    delay = backoff(attempt, base=FIRST_BACKOFF, cap=MAX_BACKOFF)
                    attempt += 1
                    log.warning("pending delete of job=%s owner=%d from %s failed; retry_in=%.1fs error=%s", key[1],
                                key[0], self.store.describe(), delay, exc or "timed out")
                    await anyio.sleep(delay)
                    continue
                await self._done_delete(key)
                log.info("completed the pending delete of job=%s owner=%d from %s objects=%d bytes=%d", key[1],
                         key[0], self.store.describe(), objects, nbytes)
        finally:
            self._completing.discard(key)

    async def wait_replicated(self, key: JobKey, version: int) -> int:
        """Until ``version`` (or a newer one) is in the bucket; returns the replicated version."""
        replica = self.replicas.get(key)
        if replica is None:
            raise StorageError(f"job {key[1]!r} is not replicated")
        while replica.replicated is None or replica.replicated < version:
            if replica.gone:
                raise NotFound(replica.gone)
            if self.refused:
                raise StorageError(f"job {key[1]!r} cannot be replicated: {self.refused}")
            if replica.fenced:
                raise StorageError(f"job {key[1]!r} cannot be replicated: {replica.fenced}")
            event = anyio.Event()
            replica.waiters.append((version, event))
            await event.wait()
        return replica.replicated

    def status(self, key: JobKey) -> dict[str, Any] | None:
        replica = self.replicas.get(key)
        if replica is None:
            return None
        out = replica.status()
        if self.refused:
            out["last_error"] = self.refused
        elif replica.last_error is None and self.last_probe_error:
            out["last_error"] = self.last_probe_error
        return out

    def summary(self) -> dict[str, Any]:
        return {"url": self.store.location.url, "endpoint": self.store.endpoint, "refused": self.refused,
                "reachable": self.probed.is_set(), "holder": self.holder, "upload_throttle": self.rate.status(),
                # O(1) for every user's status (issue 19): a finished delete leaves the dict (_done_delete).
                "pending_deletes": len(self.deleting)}

    def flush_upload_rate(self) -> float | None:
        """The rate a deadline flush plans uploads with: the measured one (else a modest default), held to
        ``upload_rate``; ``None`` while the store is refused or unreachable (then nothing will go up, and
        the flush plans the local saves alone)."""
        if self.refused or not self.probed.is_set():
            return None
        if self.replicas and all(r.last_error for r in self.replicas.values()):
            return None
        return min(self.upload_speed or DEFAULT_UPLOAD_SPEED, self.rate.ctl.ceiling)

    def backlog_bytes(self) -> dict[JobKey, int]:
        """Per job, the bytes still to upload of its committed versions (estimated until each upload
        counts them exactly)."""
        return {k: r.backlog_bytes for k, r in self.replicas.items()
                if r.queue and not r.fenced}  # a fenced job uploads nothing more: it takes no link time

    def backlog(self) -> list[tuple[JobKey, list[int]]]:
        return [(k, list(r.queue)) for k, r in self.replicas.items() if r.queue]

    async def drain(self, timeout: float) -> None:
        """The shutdown flush: wait (up to ``timeout``) until every queued version is uploaded."""
        with anyio.move_on_after(max(0.0, timeout)):
            while any(r.queue and not r.fenced for r in self.replicas.values()) and not self.refused:
                await anyio.sleep(0.05)

    # -- the per-job task ---------------------------------------------------------------------------

    async def _run(self, replica: Replica, local_ids: list[int]) -> None:
        with anyio.CancelScope() as scope:
            replica.scope = scope
            if replica.gone is None:
                await self._replicate(replica, local_ids)

    async def _replicate(self, replica: Replica, local_ids: list[int]) -> None:
        attempt = 0
        await self.probed.wait()
        if self._deleting(replica.key):
            # A job recreated after a delete the bucket has not seen yet: it publishes (as a new
            # incarnation, over the tombstone) only once the deleted one's objects are gone.
            replica.last_error = "waiting for the deleted job's objects to be deleted from the bucket"
            await self.deleting[replica.key].wait()
        while True:
            try:
                async with self.catch_ups:  # a host with many jobs does not list them all at once
                    await self._catch_up(replica, local_ids)
                break
            except (RemoteError, OSError) as exc:
                self._failed(replica, str(exc))
                await anyio.sleep(backoff(attempt, base=FIRST_BACKOFF, cap=MAX_BACKOFF))
                attempt += 1
        attempt = 0
        while not replica.fenced:
            if not replica.queue:
                replica.wake = anyio.Event()
                with anyio.move_on_after(self._renew_every(replica)):
                    await replica.wake.wait()
                if not replica.queue:
                    await self._keep_lease(replica)
                    await self._maybe_gc(replica)
                    continue
            version = replica.queue[0]
            try:
                await self._upload(replica, version)
            except Fenced as exc:
                self._fence(replica, str(exc))
                return
            except LeaseHeld as exc:
                self._failed(replica, str(exc))
                delay = backoff(attempt, base=FIRST_BACKOFF, cap=MAX_BACKOFF)
                await anyio.sleep(min(delay, self.settings.lease_ttl / 2))
                attempt += 1
                continue
            except (RemoteError, OSError, TimeoutError) as exc:
                self._failed(replica, str(exc))
                delay = backoff(attempt, base=FIRST_BACKOFF, cap=MAX_BACKOFF)
                attempt += 1
                log.warning("upload failed job=%s version=%d retry_in=%.1fs error=%s", replica.key[1], version,
                            delay, exc)
                await anyio.sleep(delay)
                continue
            except (CorruptVersion, AutosavedError) as exc:
                # The local version cannot be read: nothing to upload for it; say so loudly.
                log.error("cannot replicate job=%s version=%d: %s", replica.key[1], version, exc)
                self._failed(replica, f"version {version} not replicated: {exc}")
                replica.queue.remove(version)
                continue
            attempt = 0
            replica.last_error = None
            replica.queue.remove(version)
            replica.queued_bytes.pop(version, None)
            replica.replicated = version
            replica.replicated_at = time.time()
            replica.versions_uploaded += 1
            self._release(replica)
            await self._maybe_gc(replica)

    def _renew_every(self, replica: Replica) -> float:
        return self.settings.lease_ttl / 3 if replica.lease is not None else math.inf

    def _failed(self, replica: Replica, why: str) -> None:
        replica.last_error = why
        self.upload_errors += 1

    def _fence(self, replica: Replica, why: str) -> None:
        replica.fenced = why
        self._failed(replica, why)
        replica.lease = None
        log.error("fenced job=%s: %s", replica.key[1], why)
        for _, event in replica.waiters:
            event.set()
        replica.waiters.clear()

    def _release(self, replica: Replica) -> None:
        keep = []
        for version, event in replica.waiters:
            if replica.replicated is not None and replica.replicated >= version:
                event.set()
            else:
                keep.append((version, event))
        replica.waiters = keep

    async def _keep_lease(self, replica: Replica) -> None:
        if replica.lease is None:
            return
        try:
            await replica.remote.renew(replica.lease, self.settings.lease_ttl)
        except Fenced as exc:
            self._fence(replica, str(exc))
        except (RemoteError, OSError) as exc:
            self._failed(replica, str(exc))

    async def _catch_up(self, replica: Replica, local_ids: list[int]) -> None:
        """After a (re)start: the newest local version the bucket has, and the local ones after it."""
        newest = await replica.remote.newest_replicated(replica.local, local_ids)
        replica.replicated = newest
        pending = [v for v in local_ids if newest is None or v > newest]
        for v in pending:
            if v not in replica.queue:
                replica.queue.append(v)
        replica.queue = sorted(v for v in replica.queue if newest is None or v > newest)
        replica.last_error = None
        self._release(replica)

    async def _lease(self, replica: Replica) -> Lease:
        if replica.lease is None:
            incarnation = await anyio.to_thread.run_sync(ensure_incarnation, replica.local)
            replica.lease = await replica.remote.acquire(self.holder, self.settings.lease_ttl,
                                                         incarnation=incarnation)
            replica.known = None  # a new epoch: look at the bucket afresh
            log.info("lease job=%s epoch=%d holder=%s incarnation=%s", replica.key[1], replica.lease.epoch,
                     self.holder, incarnation)
            if replica.lease.replaced is not None:
                log.warning("job=%s: this host's copy (incarnation %s) was started anew while the bucket held "
                            "incarnation %s; it is the job now, and the older one's versions are no longer "
                            "read (remote gc removes them)", replica.key[1], incarnation, replica.lease.replaced)
        return replica.lease

    async def _upload(self, replica: Replica, version: int) -> None:
        lease = await self._lease(replica)
        if replica.known is None:
            replica.known = {d: k for d, (k, _) in (await replica.remote.chunk_index()).items()}
            replica.complete = set()  # goes stale with known: a version's first upload walks all its pages

        def planned(nbytes: int) -> None:
            replica.queued_bytes[version] = nbytes

        def sent(nbytes: int) -> None:
            # Bytes sent count even when the bucket answered 412 (it had the chunk after all).
            replica.bytes_uploaded += nbytes
            self.bytes_uploaded += nbytes
            replica.chunks_uploaded += 1
            replica.queued_bytes[version] = max(0, replica.queued_bytes.get(version, 0) - nbytes)

        started, held, before = time.monotonic(), self.rate.throttled_s, replica.bytes_uploaded
        chunks = await upload_version(replica.remote, replica.local, version, lease, holder=self.holder,
                                      ttl=self.settings.lease_ttl, known=replica.known,
                                      complete=replica.complete, pace=self.rate,
                                      planned=planned, sent=sent)
        nbytes, elapsed = replica.bytes_uploaded - before, time.monotonic() - started
        # Only uploads the throttle did not hold back say how fast the link is (the deadline plans with it).
        if nbytes >= SPEED_SAMPLE_MIN and elapsed > 0.01 and self.rate.throttled_s == held:
            speed = nbytes / elapsed
            self.upload_speed = speed if self.upload_speed is None else 0.7 * self.upload_speed + 0.3 * speed
        log.info("replicated job=%s version=%d epoch=%d chunks=%d", replica.local.job, version, lease.epoch, chunks)

    async def _maybe_gc(self, replica: Replica) -> None:
        """Remote retention and collection, at most once a minute, by the lease holder only."""
        if replica.lease is None or time.monotonic() - replica.last_gc < 60.0:
            return
        replica.last_gc = time.monotonic()
        keep_last, keep_every = self.retention(replica.key)
        if self.settings.keep_last is not None:
            keep_last = self.settings.keep_last
        if self.settings.keep_every is not None:  # 0: off
            keep_every = self.settings.keep_every
        try:
            result = await replica.remote.collect(keep_last=keep_last, keep_every=keep_every,
                                                  grace=self.settings.gc_grace, lease=replica.lease,
                                                  ttl=self.settings.lease_ttl)
        except Fenced as exc:
            self._fence(replica, str(exc))
            return
        except (RemoteError, OSError) as exc:
            log.warning("remote gc failed job=%s: %s", replica.key[1], exc)
            return
        if result.deleted_versions or result.removed_chunks:
            replica.known = None  # chunks went: look again before trusting the cache
            log.info("remote gc job=%s deleted_versions=%s removed_chunks=%d", replica.key[1],
                     result.deleted_versions, result.removed_chunks)
