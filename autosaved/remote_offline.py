"""Reading a job straight from the object store, with no daemon and no local state: the host is gone.

Sync wrappers over :mod:`autosaved.storage.remote` for ``autosaved.restore(job, remote=...)`` and the
``restore``/``list`` commands' ``--remote``. The endpoint is ``endpoint=`` / ``--endpoint``, else the
standard ``AWS_ENDPOINT_URL``, else AWS itself; region and credentials come from the standard AWS
environment variables.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

from .errors import CorruptVersion, Forbidden
from .storage.remote import RemoteLoaded, RemoteStore

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
                owner: int | None = None,
                on_skip: Callable[[CorruptVersion], None] | None = None) -> RemoteLoaded | None:
    store = RemoteStore(remote, endpoint=endpoint)
    rjob = store.job(check_owner(owner), job)
    return run_sync(lambda: rjob.load_version(version, on_skip))


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
            ids = [vk.id for vk in await store.job(o, name).visible_versions()]
            rows.append({"job": name, "owner": o, "versions": len(ids), "latest": ids[-1] if ids else None,
                         "bytes": 0, "dirty": False})
        return rows

    return run_sync(main)
