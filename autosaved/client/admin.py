"""The admin API: requests about the daemon and about any job, as SDK calls (what ``autosaved list``,
``status``, ``delete``, ``verify``, ``gc``, ``restore``/``export`` and ``import`` use)::

    with autosaved.Admin() as admin:
        admin.status()["daemon"]["saves"]
        admin.jobs()                # and admin.versions("job")
        admin.verify("job")         # → one report per job, as `autosaved verify --json` prints
        admin.delete("job")

``owner`` acts on another user's jobs (the daemon honours it for root only). An admin never says hello,
so it registers no job with the daemon. :class:`AsyncAdmin` is the same API, awaitable.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any

from .aio import AsyncConnection
from .base import DEFAULT_SAVE_TIMEOUT, DEFAULT_TIMEOUT, resolve_address, same_docs_as
from .core import AdminCore, ClientCore, Exported, Replaced
from .slots import SlotPool
from .sync import Connection


class Admin:
    """The admin API, blocking (see the module's docstring); ``owner``: act on that uid's jobs (root only)."""

    def __init__(self, *, address: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 save_timeout: float = DEFAULT_SAVE_TIMEOUT, owner: int | None = None) -> None:
        address = resolve_address(address)
        self.owner = owner
        self._core = AdminCore(owner)
        # Only replace() sends state, and only its large leaves use shared memory.
        self._slots = SlotPool(address, timeout=timeout)
        self._conn = Connection(address, timeout=timeout, save_timeout=save_timeout, on_close=self._slots.reset)

    @property
    def address(self) -> str:
        return self._conn.address

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection (a later request opens a new one)."""
        self._conn.close()

    def ping(self) -> dict[str, Any]:
        """The daemon answers (``DaemonUnavailable`` when it does not)."""
        return self._conn.run(self._core.ping())

    def status(self, job: str | None = None) -> dict[str, Any]:
        """``{"daemon": ..., "jobs": [...]}`` (the caller's jobs; every job for root), or one job's status."""
        return self._conn.run(self._core.status(job))

    def jobs(self) -> list[dict[str, Any]]:
        """The jobs (yours; every job for root): name, owner, versions, latest, bytes, dirty."""
        return self._conn.run(self._core.jobs())

    def versions(self, job: str) -> list[dict[str, Any]]:
        """One job's stored versions: id, step, time, bytes, reason, ok (verified) and error."""
        return self._conn.run(self._core.versions(job))

    def delete(self, job: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Forget a job, its live state and every stored version: ``{"job", "owner", "deleted_versions"}``,
        and with ``[remote]`` ``"remote"``: ``{"url", "state": "deleted"|"pending", "objects", "bytes", "error"}``.
        ``dry_run``: delete nothing; say what would go on this host (adds ``freed_bytes``, ``unsaved_bytes``)."""
        return self._conn.run(self._core.delete(job, dry_run=dry_run))

    def verify(self, job: str | None = None) -> list[dict[str, Any]]:
        """Check every stored version of one job (or of every job) against its checksums."""
        return self._conn.run(self._core.maintain("verify", job))

    def gc(self, job: str | None = None, *, dry_run: bool = False) -> list[dict[str, Any]]:
        """Apply retention and remove chunks no version references, for one job or every job
        (``dry_run``: what would go, in versions and bytes; nothing is deleted)."""
        return self._conn.run(self._core.maintain("gc", job, dry_run=dry_run))

    def export(self, job: str, version: int | None = None) -> Exported | None:
        """The job's newest state (or stored ``version``) with raw blob leaves; ``None``: no state."""
        return self._conn.run(self._core.export(job, version))

    def replace(self, job: str, state: Mapping[Any, Any], *, step: int | None = None,
                meta: Mapping[str, Any] | None = None) -> Replaced:
        """Commit ``state`` as the job's whole state (keys it lacks are removed) and wait for the version."""
        core = ClientCore(job, slots=self._slots, owner=self.owner)
        return self._conn.run(self._core.replace(core, state, step=step, meta=meta))


@same_docs_as(Admin)
class AsyncAdmin:
    def __init__(self, *, address: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 save_timeout: float = DEFAULT_SAVE_TIMEOUT, owner: int | None = None) -> None:
        address = resolve_address(address)
        self.owner = owner
        self._core = AdminCore(owner)
        self._slots = SlotPool(address, timeout=timeout)
        self._conn = AsyncConnection(address, timeout=timeout, save_timeout=save_timeout,
                                     on_close=self._slots.reset)

    @property
    def address(self) -> str:
        return self._conn.address

    async def __aenter__(self) -> AsyncAdmin:
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._conn.close()

    async def ping(self) -> dict[str, Any]:
        return await self._conn.run(self._core.ping())

    async def status(self, job: str | None = None) -> dict[str, Any]:
        return await self._conn.run(self._core.status(job))

    async def jobs(self) -> list[dict[str, Any]]:
        return await self._conn.run(self._core.jobs())

    async def versions(self, job: str) -> list[dict[str, Any]]:
        return await self._conn.run(self._core.versions(job))

    async def delete(self, job: str, *, dry_run: bool = False) -> dict[str, Any]:
        return await self._conn.run(self._core.delete(job, dry_run=dry_run))

    async def verify(self, job: str | None = None) -> list[dict[str, Any]]:
        return await self._conn.run(self._core.maintain("verify", job))

    async def gc(self, job: str | None = None, *, dry_run: bool = False) -> list[dict[str, Any]]:
        return await self._conn.run(self._core.maintain("gc", job, dry_run=dry_run))

    async def export(self, job: str, version: int | None = None) -> Exported | None:
        return await self._conn.run(self._core.export(job, version))

    async def replace(self, job: str, state: Mapping[Any, Any], *, step: int | None = None,
                      meta: Mapping[str, Any] | None = None) -> Replaced:
        core = ClientCore(job, slots=self._slots, owner=self.owner)
        return await self._conn.run(self._core.replace(core, state, step=step, meta=meta))
