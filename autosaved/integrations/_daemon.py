"""The few requests the multi-rank integration makes besides ``Client.update``/``restore``: a job's
versions and the daemon's boot id. One place, so that they follow the SDK's admin API.

Why the imports are dynamic: this branch was written while the client was being refactored into request
flows with a public ``autosaved.client.admin.Admin`` (issue 10). With ``Admin`` present it is used; before
it, the same ``list``/``ping`` requests go through ``Client``'s request core. Once both are merged, the
fallback can go.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..client.sync import Client
from ..errors import DaemonUnavailable, NotFound


def _admin_class() -> Any:
    try:
        return importlib.import_module("autosaved.client.admin").Admin
    except ImportError:
        return None


def validate_job_name(name: object) -> str:
    for module in ("autosaved.names", "autosaved.protocol"):
        try:
            check = importlib.import_module(module).validate_job_name
        except (ImportError, AttributeError):
            continue
        result: str = check(name)
        return result
    raise ImportError("autosaved has no validate_job_name")  # pragma: no cover


def versions(address: str, job: str, timeout: float) -> list[dict[str, Any]]:
    """``job``'s stored versions as ``autosaved list JOB --json`` shows them (the daemon re-hashes each one,
    so ``ok`` is verified); ``[]`` when the daemon has no such job."""
    admin = _admin_class()
    try:
        if admin is not None:
            with admin(address=address, timeout=timeout, save_timeout=max(timeout, 600.0)) as a:
                return list(a.versions(job))
        client = Client(job, address=address, timeout=timeout, save_timeout=max(timeout, 600.0))
        try:
            # getattr: these private names are gone once the Admin API is merged (and then unused).
            reply = getattr(client, "_call")(getattr(client, "_core").list_jobs(job))  # noqa: B009
            return list(reply.get("versions") or [])
        finally:
            client.close()
    except NotFound:
        return []


def boot(address: str, timeout: float) -> str | None:
    """The daemon's boot id (a ping), or ``None`` when it does not answer within ``timeout``."""
    admin = _admin_class()
    try:
        if admin is not None:
            with admin(address=address, timeout=timeout) as a:
                return str(a.ping().get("boot"))
        client = Client("_probe", address=address, timeout=timeout)
        try:
            return str(getattr(client, "_call")(getattr(client, "_core").ping()).get("boot"))  # noqa: B009
        finally:
            client.close()
    except DaemonUnavailable:
        return None
