"""The few requests the multi-rank integration makes besides ``Client.update``/``restore``: a job's
versions and the daemon's boot id, through the SDK's public admin API."""

from __future__ import annotations

from typing import Any

from ..client.admin import Admin
from ..errors import DaemonUnavailable, NotFound
from ..names import validate_job_name

__all__ = ["boot", "validate_job_name", "versions"]


def versions(address: str, job: str, timeout: float) -> list[dict[str, Any]]:
    """``job``'s stored versions as ``autosaved list JOB --json`` shows them (the daemon re-hashes each one,
    so ``ok`` is verified); ``[]`` when the daemon has no such job."""
    try:
        with Admin(address=address, timeout=timeout, save_timeout=max(timeout, 600.0)) as admin:
            return list(admin.versions(job))
    except NotFound:
        return []


def boot(address: str, timeout: float) -> str | None:
    """The daemon's boot id (a ping), or ``None`` when it does not answer within ``timeout``."""
    try:
        with Admin(address=address, timeout=timeout) as admin:
            return str(admin.ping().get("boot"))
    except DaemonUnavailable:
        return None
