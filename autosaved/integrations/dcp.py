"""PyTorch Distributed Checkpoint (DCP) through autosaved: one global version per multi-rank save.

    import torch.distributed.checkpoint as dcp
    from autosaved.integrations.dcp import AutosavedStorageWriter, AutosavedStorageReader, global_version

    md = dcp.save(state, storage_writer=AutosavedStorageWriter("llm"))     # every rank; returns on all ranks
    print(global_version(md))                                             # the committed global version id
    dcp.load(state, storage_reader=AutosavedStorageReader("llm"))          # newest committed global version

How it works (see :mod:`autosaved.integrations.globalver` for the record):

- ``prepare_global_plan`` (coordinator) draws a fresh token for this save and hands it to every rank in
  its plan, so a part can never be mistaken for one of another save.
- ``write_data`` (every rank) sends all of the rank's items to the rank's *own host's* daemon as one
  update of the job ``<job>.rank-<r>`` at ``wait`` (bulk tensors through the shared-memory slots), and
  returns the committed part version, its hash and the daemon's address inside its write results. Any
  failure raises, and DCP carries that exception to the coordinator in its gather *before* ``finish``.
- ``finish`` (coordinator; DCP calls it only when no rank failed) checks that every part is there, is of
  this save and reached ``wait``, then commits the global record as a version of ``<job>`` on its own
  daemon. That commit is the one global commit point: no record, no global version. The record's id is
  written into ``metadata.storage_meta.checkpoint_id`` (``autosaved:<job>@<id>``), which DCP broadcasts
  to every rank as the return value of ``save``.
- ``read_metadata`` (every rank) looks for the record on its own daemon (then ``record_address``, then
  ``remote``: the object store, for fresh hosts after a ``wait="replicated"`` save), then all ranks agree over
  ``torch.distributed`` on one record (the requested version, or the newest) and the rank that has it
  broadcasts it. ``read_data`` reads each part from the rank's own daemon if it holds it (same version
  and hash), else from the daemon the record names (same host for ``ipc://``; ``tcp://`` in trusted
  setups), else from ``remote`` when one is configured.

The writer is also an ``AsyncStager``: ``dcp.async_save`` copies the state into CPU buffers that are
reused from save to save (already faulted in, so the copy runs at memory speed); the send to the daemon
then happens on DCP's background thread.
"""

from __future__ import annotations

import io
import os
import pickle
import secrets
import socket
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..client.base import Ack, resolve_address
from ..client.sync import Client
from ..errors import AutosavedError, CorruptVersion, DaemonUnavailable, NotFound
from . import _daemon
from .globalver import (
    PART_KEY,
    GlobalRecord,
    PartInfo,
    check_parts,
    is_global_row,
    parse_record,
    part_hash,
    part_job,
    record_meta,
    record_state,
)

__all__ = ["AutosavedStorageReader", "AutosavedStorageWriter", "ObjectStoreSource", "RemoteSource", "global_version"]

CHECKPOINT_PREFIX = "autosaved:"
# Part jobs keep this many versions: the newest global version stays loadable through up to
# keep_parts - 1 failed saves in a row (each leaves an orphaned part that retention collects later).
DEFAULT_KEEP_PARTS = 8


@dataclass(frozen=True)
class _PlanData:
    """What the coordinator tells each rank in its plan."""

    token: str
    rank: int


@dataclass(frozen=True)
class _ItemRef:
    """Where one DCP item lives: item ``index`` of rank ``rank``'s part. Kept in ``Metadata.storage_data``."""

    rank: int
    index: int


@dataclass(frozen=True)
class _PartResult:
    """A rank's part as its write results carry it to the coordinator."""

    ref: _ItemRef
    part: PartInfo
    token: str
    level: str


class RemoteSource(Protocol):
    """Where the record and the parts come from when no reachable daemon holds them: the object store
    the daemons replicate to (:class:`ObjectStoreSource`), read with no daemon at all."""

    def versions(self, job: str) -> list[dict[str, Any]]:
        """``job``'s versions as ``list --json`` rows (``id``, ``time``, ``meta``, ``ok``); ``[]`` if none."""
        ...

    def restore(self, job: str, version: int) -> Any:
        """Stored version ``version`` of ``job``, tensors as torch (every chunk verified)."""
        ...


class ObjectStoreSource:
    """The bucket the daemons' ``[remote]`` replicates to, read straight from the store (the hosts and
    their state dirs may be gone). ``url``: the daemons' ``remote.url`` (``s3://bucket/prefix``);
    ``endpoint``: for non-AWS stores (default ``AWS_ENDPOINT_URL``); credentials and region from the
    standard AWS environment. ``owner``: whose jobs (default: the caller's uid). Needs ``autosaved[s3]``.

    Only what was replicated is there: save with ``AutosavedStorageWriter(job, wait="replicated")``, so
    every part and the global record itself are in the bucket before ``save`` returns."""

    def __init__(self, url: str, *, endpoint: str | None = None, owner: int | None = None) -> None:
        self.url = url
        self.endpoint = endpoint
        self.owner = owner

    def versions(self, job: str) -> list[dict[str, Any]]:
        from ..remote_offline import list_remote

        try:
            return list_remote(self.url, endpoint=self.endpoint, job=job, owner=self.owner)
        except NotFound:
            return []

    def restore(self, job: str, version: int) -> Any:
        from ..offline import restore

        return restore(job, remote=self.url, endpoint=self.endpoint, version=version, owner=self.owner,
                       tensors="torch")


def global_version(metadata: Metadata) -> int | None:
    """The committed global version id a ``dcp.save`` through :class:`AutosavedStorageWriter` returned."""
    meta = getattr(metadata, "storage_meta", None)
    cid = str(getattr(meta, "checkpoint_id", "") or "")
    if not cid.startswith(CHECKPOINT_PREFIX) or "@" not in cid:
        return None
    return int(cid.rsplit("@", 1)[1])


def _parse_checkpoint_id(checkpoint_id: str | os.PathLike[str]) -> tuple[str, int | None]:
    cid = str(checkpoint_id)
    if not cid.startswith(CHECKPOINT_PREFIX):
        raise ValueError(f"checkpoint_id {cid!r} is not an autosaved id ('autosaved:JOB' or 'autosaved:JOB@VERSION')")
    body = cid.removeprefix(CHECKPOINT_PREFIX).removeprefix("//")
    job, _, version = body.partition("@")
    return job, int(version) if version else None


def _check_reachable(address: str) -> None:
    """Fail at once, not after a timeout, when an ipc socket file is there but nobody listens on it (a
    daemon that was SIGKILLed leaves its socket file behind)."""
    if not address.startswith("ipc://"):
        return
    path = address.removeprefix("ipc://")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnavailable(f"no autosaved daemon listens at {address} ({exc.strerror})",
                                details={"address": address}) from None
    except OSError:
        pass  # anything else (a timeout, a permission quirk): let the client's own timeouts decide
    finally:
        probe.close()


@contextmanager
def _client(job: str, address: str, timeout: float, save_timeout: float,
            policy: Mapping[str, Any] | None = None) -> Iterator[Client]:
    _check_reachable(address)
    client = Client(job, address=address, timeout=timeout, save_timeout=save_timeout, policy=policy)
    try:
        yield client
    finally:
        client.close()


def _watched_update(job: str, address: str, delta: Mapping[str, Any], meta: Mapping[str, Any], wait: str,
                    timeout: float, save_timeout: float, policy: Mapping[str, Any] | None = None,
                    probe_every: float = 1.0) -> Ack:
    """``update(delta, wait=wait)`` that fails within about a second when the daemon dies or restarts
    while it commits, instead of after ``save_timeout``: a rank stuck on a dead daemon would keep the
    other ranks in DCP's gather until the process group's timeout, and the save would fail late.

    The update runs in a helper thread (it owns its ZeroMQ socket); this thread watches the daemon: the
    ipc socket must accept connections and a ping must show the same boot id as before the update."""
    _check_reachable(address)
    boot = _daemon.boot(address, timeout)
    if boot is None:
        raise DaemonUnavailable(f"the autosaved daemon at {address} does not answer", details={"address": address})
    box: dict[str, Any] = {}
    done = threading.Event()

    def send() -> None:
        try:
            with _client(job, address, timeout, save_timeout, policy) as c:
                box["ack"] = c.update(delta, meta=meta, wait=wait)
        except BaseException as exc:
            box["error"] = exc
        finally:
            done.set()

    # A daemon thread: if the daemon died, the abandoned request must not keep the process alive.
    threading.Thread(target=send, name=f"autosaved-dcp-{job}", daemon=True).start()
    while not done.wait(probe_every):
        _check_reachable(address)
        now = _daemon.boot(address, timeout)
        if now is not None and now != boot:
            raise DaemonUnavailable(f"the autosaved daemon at {address} restarted while committing {job!r}; "
                                    "the part is lost", details={"address": address})
    if "error" in box:
        raise box["error"]
    ack: Ack = box["ack"]
    return ack


def _committed_part(part: PartInfo, timeout: float, save_timeout: float) -> PartInfo:
    """``part`` with the id of a committed version of its job that holds exactly it (its hash in the
    version's manifest meta): one committed already (an idle save, or its daemon's SIGTERM/preemption
    flush, after which the daemon may have been restarted), else the one an explicit save commits now.
    Raises when the daemon cannot be reached or no committed version holds the part."""

    def holding() -> int | None:
        rows = _daemon.versions(part.address, part.job, timeout)
        for row in reversed(rows):
            meta = (row.get("meta") or {}).get(PART_KEY)
            if row.get("ok") and isinstance(meta, Mapping) and meta.get("hash") == part.hash:
                return int(row["id"])
        return None

    try:
        _check_reachable(part.address)
        version = holding()
        if version is None:
            with _client(part.job, part.address, timeout, save_timeout) as c:
                c.save()
            version = holding()
    except DaemonUnavailable as exc:
        raise DaemonUnavailable(f"rank {part.rank}'s part ({part.job}) cannot be confirmed committed: {exc}; "
                                "nothing published", details={"address": part.address}) from None
    if version is None:
        raise AutosavedError(f"rank {part.rank}'s part ({part.job}) is in no committed version on "
                             f"{part.address}: it was lost before it was committed; nothing published")
    return replace(part, version=version)


def _restore(client: Client, version: int) -> Any:
    return client.restore(version, tensors="torch")


def _tensor_of(data: Any) -> Any:
    t = data.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t


class AutosavedStorageWriter(StorageWriter, AsyncStager):
    """A DCP ``StorageWriter`` that stores every rank's shard with its host's autosaved daemon and
    commits one global version of ``job`` when every part is durable at ``wait``.

    ``address``: this rank's daemon (default: ``AUTOSAVED_ADDRESS`` or the standard socket).
    ``wait``: the ack level every part and the record must reach: ``"committed"``, or ``"replicated"``
    when the daemons have a ``[remote]`` store (then the parts and the record are in the bucket too, and
    :class:`ObjectStoreSource` loads them with every host gone). ``"accepted"``: each rank returns as soon
    as its daemon has the part in memory; the coordinator's ``finish`` then makes sure every part is in a
    committed version on its daemon (already committed, e.g. by that daemon's shutdown flush, or by an
    explicit save it asks for) and commits the record only if all are; it needs every part's daemon
    reachable from the coordinator (same host for ``ipc://``, or ``tcp://``).
    ``keep_parts``: versions each part job keeps (see the module notes).
    """

    _synchronize_after_execute = False

    def __init__(self, job: str, *, address: str | None = None, wait: str = "committed", timeout: float = 30.0,
                 save_timeout: float = 600.0, keep_parts: int = DEFAULT_KEEP_PARTS) -> None:
        if wait not in ("accepted", "committed", "replicated"):
            raise ValueError(f"wait={wait!r}: a global version names committed part versions; use 'committed', "
                             "'replicated', or 'accepted' (parts committed by their daemons before the "
                             "coordinator publishes)")
        if keep_parts < 1:
            raise ValueError(f"keep_parts must be at least 1, not {keep_parts}")
        # Fail on a bad name here, not in the middle of a save (the part jobs' names derive from it).
        self.job = _daemon.validate_job_name(job)
        _daemon.validate_job_name(part_job(job, 0))
        self.address = resolve_address(address)
        self.wait = wait
        self.timeout = timeout
        self.save_timeout = save_timeout
        self.keep_parts = keep_parts
        self.checkpoint_id: str | None = None
        self.is_coordinator = False
        self.rank = 0
        self.last_version: int | None = None
        # Staging buffers for async_save, reused while no background write still reads them.
        self._lock = threading.Lock()
        self._free: list[Any] = []
        self._in_use: list[Any] = []

    # -- DCP's StorageWriter interface --------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            job, _ = _parse_checkpoint_id(checkpoint_id)
            if job != self.job:
                raise ValueError(f"checkpoint_id {str(checkpoint_id)!r} names job {job!r}, but this writer "
                                 f"writes {self.job!r}")

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return str(checkpoint_id).startswith(CHECKPOINT_PREFIX)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=f"{CHECKPOINT_PREFIX}{self.job}")

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        if "rank" in kwargs:
            self.rank = int(kwargs["rank"])
        elif dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        token = secrets.token_hex(16)
        return [replace(plan, storage_data=_PlanData(token=token, rank=i)) for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            results = self._write(plan, planner)
        finally:
            self._release_staging()
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _write(self, plan: SavePlan, planner: SavePlanner) -> list[WriteResult]:
        data = plan.storage_data
        if not isinstance(data, _PlanData):
            raise AutosavedError(f"rank {self.rank}: the save plan carries no autosaved token; was "
                                 "prepare_global_plan run by an AutosavedStorageWriter?")
        rank = data.rank
        keys: list[str] = []
        values: list[Any] = []
        sizes: list[int] = []
        for i, item in enumerate(plan.items):
            resolved = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                raw = resolved.getvalue() if isinstance(resolved, io.BytesIO) else bytes(resolved)
                values.append(raw)
                sizes.append(len(raw))
            else:
                tensor = _tensor_of(resolved)
                values.append(tensor)
                sizes.append(tensor.numel() * tensor.element_size())
            keys.append(f"{i}:{item.index.fqn}")
        if not plan.items:
            return []  # nothing of this rank is needed by the checkpoint: no part
        job = part_job(self.job, rank)
        digest = part_hash(data.token, rank, keys, values)
        delta = {PART_KEY: {"token": data.token, "rank": rank, "keys": keys, "values": values}}
        meta = {PART_KEY: {"token": data.token, "rank": rank, "hash": digest}}
        ack = _watched_update(job, self.address, delta, meta, self.wait, self.timeout, self.save_timeout,
                              {"keep_last": self.keep_parts})
        if ack.level != self.wait or (ack.version is None and self.wait != "accepted"):
            raise AutosavedError(f"rank {rank}: the daemon at {self.address} acknowledged the part at "
                                 f"{ack.level!r}, not {self.wait!r}")
        # At "accepted" no version holds the part yet: the coordinator finds or makes it in finish.
        version = -1 if ack.version is None else int(ack.version)
        part = PartInfo(rank=rank, job=job, version=version, hash=digest, address=self.address)
        return [
            WriteResult(index=item.index, size_in_bytes=size,
                        storage_data=_PartResult(ref=_ItemRef(rank, i), part=part, token=data.token, level=ack.level))
            for i, (item, size) in enumerate(zip(plan.items, sizes, strict=True))
        ]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit the global version, or raise: never a record that names a missing or foreign part."""
        found = [wr.storage_data for wrs in results for wr in wrs]
        if any(not isinstance(r, _PartResult) for r in found):
            raise AutosavedError("a rank returned write results that are not autosaved parts; every rank "
                                 "must use an AutosavedStorageWriter")
        tokens = {r.ref.rank: r.token for r in found}
        token = next(iter(tokens.values()), None)
        if token is None:
            raise AutosavedError("no rank wrote anything; nothing to commit")
        levels = {r.level for r in found}
        if levels != {self.wait}:
            raise AutosavedError(f"parts reached {sorted(levels)}, not {self.wait!r}; nothing committed")
        parts = check_parts({r.part for r in found}, token, tokens)
        record_wait = self.wait
        if self.wait == "accepted":
            # Every part must be in a committed version before the record may name it; one that is not
            # (its daemon lost it, or cannot be reached to confirm) means no global version at all.
            parts = [_committed_part(p, self.timeout, self.save_timeout) for p in parts]
            record_wait = "committed"
            by_rank = {p.rank: p for p in parts}
            found = [replace(r, part=by_rank[r.ref.rank], level="committed") for r in found]
        world_size = len(results)
        metadata.storage_data = {wr.index: wr.storage_data.ref for wrs in results for wr in wrs}
        blob = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
        state = record_state(token=token, world_size=world_size, parts=parts, metadata=blob)
        ack = _watched_update(self.job, self.address, state, record_meta(world_size=world_size, parts=parts),
                              record_wait, self.timeout, self.save_timeout)
        if ack.version is None:
            raise AutosavedError(f"the daemon at {self.address} acknowledged the global record at {ack.level!r}")
        self.last_version = int(ack.version)
        # DCP broadcasts this object to every rank as save()'s result: that is how they learn the id.
        metadata.storage_meta = StorageMeta(checkpoint_id=f"{CHECKPOINT_PREFIX}{self.job}@{self.last_version}",
                                            save_id=token)

    # -- AsyncStager: what dcp.async_save blocks the trainer for ------------------------------------------

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copy ``state_dict`` into CPU buffers reused from earlier saves (one memory copy). A set of
        buffers is reused only once the background write that read it has returned."""
        from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

        with self._lock:
            buffers = self._free.pop() if self._free else None
        if buffers is None or not _same_layout(buffers, state_dict):
            buffers = _create_cpu_state_dict(state_dict, pin_memory=torch.cuda.is_available())
        staged = _copy_state_dict(state_dict, buffers)
        with self._lock:
            self._in_use.append(buffers)
        return staged

    def synchronize_staging(self) -> None:
        """Staging is a blocking copy: nothing to wait for."""

    def _release_staging(self) -> None:
        # Writes run one at a time, in the order of their stages (DCP's executor has one thread).
        with self._lock:
            if self._in_use:
                self._free.append(self._in_use.pop(0))

    def close(self) -> None:
        with self._lock:
            self._free.clear()


def _same_layout(buffers: Any, state_dict: Any) -> bool:
    """Whether the cached buffers can take ``state_dict`` (same keys, shapes and dtypes)."""
    if isinstance(state_dict, Mapping):
        return (isinstance(buffers, Mapping) and buffers.keys() == state_dict.keys()
                and all(_same_layout(buffers[k], v) for k, v in state_dict.items()))
    if isinstance(state_dict, list | tuple):
        return (isinstance(buffers, list | tuple) and len(buffers) == len(state_dict)
                and all(_same_layout(b, v) for b, v in zip(buffers, state_dict, strict=True)))
    if isinstance(state_dict, torch.Tensor):
        return (isinstance(buffers, torch.Tensor) and type(buffers) is type(state_dict)
                and buffers.shape == state_dict.shape and buffers.dtype == state_dict.dtype)
    return True


def _check_part(state: Any, part: PartInfo) -> dict[str, Any] | None:
    """The part's keys and values if ``state`` holds exactly ``part``, else ``None`` (another part under the
    same name and id: another save, another host)."""
    body = state.get(PART_KEY) if isinstance(state, Mapping) else None
    if not isinstance(body, Mapping):
        return None
    keys, values = list(body.get("keys") or []), list(body.get("values") or [])
    if len(keys) != len(values) or part_hash(str(body.get("token")), part.rank, keys, values) != part.hash:
        return None
    return {"keys": keys, "values": values}


class AutosavedStorageReader(StorageReader):
    """A DCP ``StorageReader`` for the global versions :class:`AutosavedStorageWriter` commits.

    ``version``: a global version id (default: the newest one that verifies). ``address``: this rank's
    daemon. ``remote``: where the record and the parts come from when no reachable daemon holds them
    (:class:`ObjectStoreSource`: the bucket of the daemons' ``[remote]``, for loads on fresh hosts).
    ``record_address``: the daemon that holds the record (the saving coordinator's), asked when this rank's
    own daemon has none: for loads on hosts whose daemons never held it. ``process_group``: the group
    ``dcp.load`` runs on (default: the default group), over which the ranks agree on one record.
    """

    def __init__(self, job: str, *, version: int | None = None, address: str | None = None,
                 remote: RemoteSource | None = None, record_address: str | None = None, timeout: float = 30.0,
                 save_timeout: float = 600.0, process_group: Any = None) -> None:
        self.job = _daemon.validate_job_name(job)
        self.version = version
        self.address = resolve_address(address)
        self.remote = remote
        self.record_address = record_address
        self.timeout = timeout
        self.save_timeout = save_timeout
        self.process_group = process_group
        self.checkpoint_id: str | None = None
        self.record: GlobalRecord | None = None
        self.sources: dict[int, str] = {}  # rank → where its part was read from (for tests and logs)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            job, version = _parse_checkpoint_id(checkpoint_id)
            if job != self.job:
                raise ValueError(f"checkpoint_id {str(checkpoint_id)!r} names job {job!r}, but this reader "
                                 f"reads {self.job!r}")
            if version is not None:
                self.version = version

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return str(checkpoint_id).startswith(CHECKPOINT_PREFIX)

    # -- the record -----------------------------------------------------------------------------------------

    def _local_record(self) -> tuple[tuple[str, int] | None, bytes | None, str | None]:
        """(sort key, pickled record, error) from this rank's own daemon, else from ``record_address``:
        the requested version, or the newest global version that verifies."""
        errors = []
        for address in dict.fromkeys(a for a in (self.address, self.record_address) if a):
            key, blob, error = self._record_from(address)
            if blob is not None:
                return key, blob, None
            errors.append(str(error))
        if self.remote is not None:
            key, blob, error = self._record_from_remote(self.remote)
            if blob is not None:
                return key, blob, None
            errors.append(str(error))
        return None, None, "; ".join(errors)

    def _record_from(self, address: str) -> tuple[tuple[str, int] | None, bytes | None, str | None]:
        def load(version: int) -> Any:
            with _client(self.job, address, self.timeout, self.save_timeout) as c:
                return _restore(c, version)

        try:
            _check_reachable(address)
            return self._pick_record(address, _daemon.versions(address, self.job, self.timeout), load)
        except AutosavedError as exc:
            return None, None, f"{address}: {exc}"

    def _record_from_remote(self, remote: RemoteSource) -> tuple[tuple[str, int] | None, bytes | None, str | None]:
        try:
            return self._pick_record("the remote store", remote.versions(self.job),
                                     lambda version: remote.restore(self.job, version))
        except Exception as exc:  # never raise before read_metadata's collectives (the others would hang)
            return None, None, f"the remote store: {type(exc).__name__}: {exc}"

    def _pick_record(self, where: str, rows: list[dict[str, Any]],
                     load: Any) -> tuple[tuple[str, int] | None, bytes | None, str | None]:
        """The requested global version, or the newest by commit time, among ``rows``; loaded."""
        rows = [r for r in rows if is_global_row(r) and r.get("ok")]
        if self.version is not None:
            rows = [r for r in rows if int(r["id"]) == self.version]
        if not rows:
            return None, None, f"{where} holds no committed global version of {self.job!r}" + (
                f" with id {self.version}" if self.version is not None else "")
        row = max(rows, key=lambda r: (str(r.get("time")), int(r["id"])))
        record = parse_record(load(int(row["id"])), int(row["id"]), self.job)
        return (str(row.get("time")), record.version), pickle.dumps(record), None

    def _group(self) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Every rank must take part in the collectives below before anything can raise, or the others hang.
        key, blob, error = self._local_record()
        group = self._group()
        if group is not None:
            found: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(found, (key, error), group=group)
            have = [(k, i) for i, (k, _) in enumerate(found) if k is not None]
            if not have:
                errors = "; ".join(sorted({e for _, e in found if e}))
                raise NotFound(f"no committed global version of {self.job!r} on any rank's daemon ({errors})")
            # The coordinator's copy when it has one; else the newest (by commit time) any rank has.
            src = 0 if found[0][0] is not None and self.version is not None else max(have)[1]
            box = [blob]
            dist.broadcast_object_list(box, group_src=src, group=group)
            blob = box[0]
        elif blob is None:
            raise NotFound(f"no committed global version of {self.job!r}: {error}")
        assert blob is not None
        record: GlobalRecord = pickle.loads(blob)
        self.record = record
        metadata: Metadata = pickle.loads(record.metadata)
        metadata.storage_meta = StorageMeta(checkpoint_id=f"{CHECKPOINT_PREFIX}{self.job}@{record.version}",
                                            save_id=record.token)
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    # -- the parts ------------------------------------------------------------------------------------------

    def _part_from(self, address: str, part: PartInfo) -> dict[str, Any] | None:
        """Part ``part`` from the daemon at ``address`` if that daemon holds exactly it, else ``None``."""
        try:
            with _client(part.job, address, self.timeout, self.save_timeout) as c:
                state = _restore(c, part.version)
        except (NotFound, DaemonUnavailable):
            return None
        return _check_part(state, part)

    def _part(self, part: PartInfo) -> dict[str, Any]:
        got = self._part_from(self.address, part)
        if got is not None:
            self.sources[part.rank] = self.address
            return got
        if part.address != self.address:
            got = self._part_from(part.address, part)
            if got is not None:
                self.sources[part.rank] = part.address
                return got
        remote_error = ""
        if self.remote is not None:
            try:
                got = _check_part(self.remote.restore(part.job, part.version), part)
            except (NotFound, CorruptVersion) as exc:
                got, remote_error = None, f" ({exc})"
            if got is not None:
                self.sources[part.rank] = "remote"
                return got
        raise CorruptVersion(
            f"global version {self.record.version if self.record else '?'} of {self.job!r}: rank {part.rank}'s "
            f"part ({part.job} version {part.version}) is neither on this rank's daemon ({self.address}) nor "
            f"readable from {part.address}"
            + ("" if self.remote is None else f" nor from the remote store{remote_error}"))

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self.record is None:
            raise AutosavedError("read_data before read_metadata")
        from torch.distributed._shard._utils import narrow_tensor_by_index

        by_rank: dict[int, list[Any]] = {}
        for req in plan.items:
            ref = self.metadata.storage_data[req.storage_index]
            by_rank.setdefault(ref.rank, []).append((req, ref))
        for rank, reqs in sorted(by_rank.items()):
            part = self._part(self.record.part(rank))
            values = part["values"]
            for req, ref in reqs:
                value = values[ref.index]
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(bytes(value)))
                    continue
                tensor = narrow_tensor_by_index(value, req.storage_offsets, req.lengths)
                target = planner.resolve_tensor(req).detach()
                if target.size() != tensor.size():
                    raise CorruptVersion(f"{req.storage_index}: stored shape {tuple(tensor.size())} does not match "
                                         f"the requested {tuple(target.size())}")
                target.copy_(tensor)
                planner.commit_tensor(req, target)
            del part, values  # one part in memory at a time
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut
