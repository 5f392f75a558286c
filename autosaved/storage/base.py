"""The storage interface: what the daemon and the CLI actually call on a store, on one screen.

:class:`~autosaved.storage.local.Store` / :class:`~autosaved.storage.local.JobStore` implement it (mypy
checks that, below). The daemon's job table, request handlers, reports and jobs are typed against these
protocols, not against the local classes.

Where the object store fits: :mod:`autosaved.storage.remote` is not a second implementation of this
interface but a replica beside it (async, create-only puts, a fencing lease): the replicator copies
committed local versions to it, and ``restore(remote=...)`` / ``seed`` read back from it into a local
:class:`JobStorage`. The replicator reads local chunk files directly, so it takes the local ``JobStore``.
Below both sits one page/chunk store (:mod:`autosaved.storage.objects`): the object names, the checks of
chunks, pages and root records, and the reader of trees by path, over two backends (the job's folder, the
job's prefix in the bucket).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..errors import CorruptVersion
    from ..settings import KeepBest
    from ..tree import Blob
    from .fsutil import Pacer
    from .local import GcResult, JobStore, LoadedVersion, Recovered, SaveResult, Store
    from .manifest import VersionInfo
    from .paged import Changed


class JobStorage(Protocol):
    """The stored versions (and write-ahead log) of one job."""

    owner: int
    job: str
    path: Path  # the job's folder: it exists once anything was stored
    log_dir: Path  # where the daemon's write-ahead log segments go

    # writing (the daemon's writer; one save of a job at a time)
    def write_version(self, tree: Any, *, version: int, step: int | None, reason: str, meta: dict[str, Any],
                      sessions: dict[str, int], chunk_size: int, pace: Pacer | None = None, wal_lsn: int = 0,
                      compression: str = "off", changed: Changed | None = None) -> SaveResult: ...
    def clean_tmp(self) -> None: ...

    # reading
    def version_ids(self) -> list[int]: ...
    def list_versions(self, *, verify: bool = True) -> list[VersionInfo]: ...
    def load(self, version: int, *, load_data: bool = True, verify: bool = True) -> LoadedVersion: ...
    def load_newest(self, *, load_data: bool = True,
                    on_skip: Callable[[CorruptVersion], None] | None = None) -> LoadedVersion | None: ...
    def recover(self, *, load_data: bool = True, repair: bool = False,
                on_skip: Callable[[CorruptVersion], None] | None = None) -> Recovered | None: ...
    def unsaved_log_records(self) -> int: ...
    def read_blob(self, blob: Blob) -> memoryview: ...
    def send_blob(self, blob: Blob, out_fd: int, offset: int, mapping: mmap.mmap) -> None: ...
    def stored_bytes(self) -> int: ...

    # maintenance
    def apply_retention(self, keep_last: int, protect: set[int] | None = None,
                        keep_every: float | None = None, *, collect: bool = True,
                        keep_best: KeepBest | None = None) -> list[int]: ...
    def gc(self, keep_last: int, keep_every: float | None, protect: set[int] | None = None, *,
           dry_run: bool = False, keep_best: KeepBest | None = None) -> GcResult: ...
    def best_versions(self, keep_best: KeepBest) -> list[int]: ...
    def check(self) -> dict[str, Any]: ...
    def delete(self) -> None: ...


class Storage(Protocol):
    """Every job's store, by (owner, name)."""

    def job(self, owner: int, job: str) -> JobStorage: ...
    def jobs(self, owner: int | None = None) -> Sequence[JobStorage]: ...


if TYPE_CHECKING:
    # The local store implements the interface: mypy fails here when the two drift.
    def _local_job_is_job_storage(store: JobStore) -> JobStorage:
        return store

    def _local_store_is_storage(store: Store) -> Storage:
        return store

