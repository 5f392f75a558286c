"""Reading a job straight from the object store, with no daemon and no local state: the host is gone.

Sync wrappers over :mod:`autosaved.storage.remote` for ``autosaved.restore(job, remote=...)`` and the
``restore``/``list`` commands' ``--remote``. The endpoint is ``endpoint=`` / ``--endpoint``, else the
standard ``AWS_ENDPOINT_URL``, else AWS itself; region and credentials come from the standard AWS
environment variables.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .errors import CorruptVersion, Forbidden
from .storage.remote import RemoteError, RemoteLoaded, RemoteStore, open_remote

if TYPE_CHECKING:
    from .config import RemoteSettings
    from .storage.local import JobStore

T = TypeVar("T")


def run_sync(func: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function to completion from sync code, also when the caller is itself inside an
    event loop (a notebook): then in a thread of its own."""
    try:
        import asyncio
        asyncio.get_running_loop()
    except RuntimeError:
        return anyio.run(func)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = anyio.run(func)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="autosaved-remote")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def check_owner(owner: int | None) -> int:
    """Whose job to read: the caller's own, or any for root (the bucket's own credentials still apply)."""
    me = os.geteuid()
    if owner is None or owner == me:
        return me
    if me != 0:
        raise Forbidden(f"uid {me} may not read jobs of uid {owner} from the object store; only root may")
    return owner


def load_remote(job: str, remote: str, *, endpoint: str | None = None, version: int | None = None,
                owner: int | None = None, on_skip: Callable[[CorruptVersion], None] | None = None,
                path: Sequence[str | int] = ()) -> RemoteLoaded | None:
    """The version (or its subtree at ``path``: only the pages on it and the chunks below are fetched)."""
    store = RemoteStore(remote, endpoint=endpoint)
    rjob = store.job(check_owner(owner), job)
    return run_sync(lambda: rjob.load_version(version, on_skip, tuple(path)))


def list_remote(remote: str, *, endpoint: str | None = None, job: str | None = None,
                owner: int | None = None) -> list[dict[str, Any]]:
    """One job's versions, or the jobs in the bucket (the caller's own; root: everyone's)."""
    store = RemoteStore(remote, endpoint=endpoint)
    me = os.geteuid()

    async def main() -> list[dict[str, Any]]:
        if job is not None:
            return [i.to_json() for i in await store.job(check_owner(owner), job).list_versions()]
        rows = []
        for o, name in await store.jobs(None if me == 0 and owner is None else check_owner(owner)):
            # What the bucket holds (no "unsaved": only the job's host knows that); deleted jobs are left out.
            row = await store.job(o, name).summary()
            if row is not None:
                rows.append(row)
        return rows

    return run_sync(main)


def unreplicated_versions(settings: RemoteSettings,
                          stores: Sequence[JobStore]) -> tuple[dict[tuple[int, str], set[int]], str | None]:
    """For ``autosaved gc --offline`` with ``[remote]``: each job's local versions the bucket does not have
    (gc keeps them). While the bucket cannot be read, every local version counts as not uploaded: an
    offline gc never deletes what may exist nowhere else. Returns the sets and the store's error, if any."""
    assert settings.url is not None
    store = open_remote(settings.url, endpoint=settings.endpoint, region=settings.region,
                        credentials_file=settings.credentials_file)
    store.timeout = settings.timeout

    async def main() -> tuple[dict[tuple[int, str], set[int]], str | None]:
        out: dict[tuple[int, str], set[int]] = {}
        error: str | None = None
        for s in stores:
            ids = await anyio.to_thread.run_sync(s.version_ids)
            newest = None
            if error is None:
                try:
                    with anyio.fail_after(3 * settings.timeout):
                        newest = await store.job(s.owner, s.job).newest_replicated(s, ids)
                except (RemoteError, TimeoutError) as exc:
                    error = str(exc) or f"the object store {store.describe()} did not answer in time"
            out[(s.owner, s.job)] = {v for v in ids if newest is None or v > newest}
        return out, error

    return run_sync(main)
