"""Reading the state dir directly, with no daemon: the host rebooted, or the daemon is broken.

Restoring must never depend on the daemon, so this path shares only the storage code with it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .codec import TensorMode, unpack
from .config import discover_state_dir
from .errors import CorruptVersion
from .protocol import validate_path, version_at_step

log = logging.getLogger("autosaved")


class CorruptVersionWarning(UserWarning):
    """A newer version failed verification and an older one was returned instead."""


def restore(job: str, *, state_dir: str | Path | None = None, version: int | None = None,
            tensors: TensorMode = "numpy", owner: int | None = None, remote: str | None = None,
            endpoint: str | None = None, step: int | None = None,
            path: Sequence[str | int] | None = None) -> Any:
    """The newest durable state of ``job`` (its newest verified version plus the write-ahead log records
    after it), or the stored version ``version``, or the newest verified version at ``step`` (``NotFound``
    if none), read from the state dir.

    Returns ``None`` when the job has nothing stored. A corrupt newer version is skipped with a
    :class:`CorruptVersionWarning`; a corrupt version asked for by id raises :class:`CorruptVersion`.
    ``owner`` is the uid whose job to read (default: the calling user).

    With ``remote="s3://bucket/prefix"`` the job is read from the object store instead (the host and its
    state dir are gone): its newest replicated version that verifies, or ``version``. ``endpoint`` is the
    store's URL for non-AWS stores (default: ``AWS_ENDPOINT_URL``, else AWS); credentials and region come
    from the standard AWS environment variables. Needs ``autosaved[s3]``.

    ``path`` (keys from the root) returns only that subtree (``None`` when the version has nothing there),
    as ``Client.restore(path=...)`` does; of a stored version (by ``version``, by ``step``, or the newest
    in the bucket) only the pages on the path and the leaves below it are read. The newest durable state
    of the state dir replays the log over the whole state, so it is verified whole and only the subtree's
    leaves are kept.
    """
    if step is not None and version is not None:
        raise ValueError("restore takes version or step, not both")
    where = validate_path(path)
    if remote is not None:
        from .remote_offline import list_remote, load_remote
        from .storage.objects import NothingAt

        if step is not None:
            version = version_at_step(list_remote(remote, endpoint=endpoint, job=job, owner=owner), step, job)

        def skipped_remote(exc: CorruptVersion) -> None:
            warnings.warn(f"skipping corrupt version of {job!r}: {exc}", CorruptVersionWarning, stacklevel=4)

        try:
            loaded = load_remote(job, remote, endpoint=endpoint, version=version, owner=owner,
                                 on_skip=skipped_remote, path=where)
        except NothingAt:
            return None
        return None if loaded is None else unpack(loaded.tree, tensors=tensors)
    # Imported here, not at the top: ``import autosaved`` (every trainer) must not load the storage layer
    # and its compressor (zstandard) for a restore it may never make.
    from .storage.local import JobStore

    store = JobStore(Path(state_dir) if state_dir else discover_state_dir(),
                     os.geteuid() if owner is None else owner, job)
    if step is not None:
        version = version_at_step([i.to_json() for i in store.list_versions(verify=True)], step, job)
    if version is not None:
        from .storage.objects import NothingAt

        try:
            tree = store.load_path(version, where) if where else store.load(version).tree
        except NothingAt:
            return None
        return unpack(tree, tensors=tensors)

    def skipped(exc: CorruptVersion) -> None:
        warnings.warn(f"skipping corrupt version of {job!r}: {exc}", CorruptVersionWarning, stacklevel=3)

    # Read-only: the log is replayed on top of the newest verified version, but never repaired here.
    recovered = store.recover(load_data=not where, repair=False, on_skip=skipped)
    if recovered is None:
        return None
    tree = recovered.tree
    if where:  # the log's records apply to the whole state; then only the leaves under the path are read
        from .storage.statepages import blobs_of

        for key in where:
            if not isinstance(tree, dict) or key not in tree:
                return None
            tree = tree[key]
        for blob in blobs_of(tree):
            blob.data = store.read_blob(blob)
    return unpack(tree, tensors=tensors)
