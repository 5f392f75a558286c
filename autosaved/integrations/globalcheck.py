"""``verify`` of global (multi-rank) versions: every part a committed global version names must still be
on the daemon the record names, verify there (the daemon re-hashes it) and carry the recorded hash.
No torch needed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import AutosavedError, DaemonUnavailable, NotFound
from . import _daemon
from .globalver import PART_KEY, RECORD_KEY, PartInfo


def _part_versions(part: PartInfo, timeout: float) -> dict[int, dict[str, Any]]:
    return {int(v["id"]): v for v in _daemon.versions(part.address, part.job, timeout)}


def check_part(part: PartInfo, timeout: float, cache: dict[tuple[str, str], Any]) -> tuple[str, str | None]:
    """("ok" | "damaged" | "unreachable", why)."""
    key = (part.address, part.job)
    if key not in cache:
        try:
            cache[key] = _part_versions(part, timeout)
        except NotFound:
            cache[key] = {}
        except DaemonUnavailable as exc:
            cache[key] = exc
        except AutosavedError as exc:
            cache[key] = exc
    versions = cache[key]
    if isinstance(versions, DaemonUnavailable):
        return "unreachable", f"rank {part.rank}: cannot check {part.job} v{part.version}: {versions.message}"
    if isinstance(versions, AutosavedError):
        return "damaged", f"rank {part.rank}: {part.job} v{part.version}: {versions.message}"
    row = versions.get(part.version)
    where = f"rank {part.rank}: {part.job} v{part.version} at {part.address}"
    if row is None:
        return "damaged", f"{where} is missing"
    if not row.get("ok"):
        return "damaged", f"{where} is damaged: {row.get('error')}"
    if ((row.get("meta") or {}).get(PART_KEY) or {}).get("hash") != part.hash:
        return "damaged", f"{where} is another part (its hash differs from the record's)"
    return "ok", None


def check_global_versions(reports: Iterable[dict[str, Any]], timeout: float = 10.0) -> None:
    """Add ``parts`` (one status per rank) to every global version in ``verify`` reports, and mark the
    version damaged (``ok`` false, ``error``) when a part is missing, damaged or another one."""
    cache: dict[tuple[str, str], Any] = {}
    for report in reports:
        for v in report.get("versions") or []:
            rec = (v.get("meta") or {}).get(RECORD_KEY)
            if not isinstance(rec, dict):
                continue
            statuses, damage = [], []
            for raw in rec.get("parts") or []:
                part = PartInfo.from_json(raw, f"{report.get('job')} v{v.get('id')}")
                status, why = check_part(part, timeout, cache)
                statuses.append({"rank": part.rank, "status": status, "error": why})
                if status == "damaged":
                    damage.append(why)
            v["parts"] = statuses
            if damage and v.get("ok"):
                v["ok"] = False
                v["error"] = "; ".join(str(d) for d in damage)
                report["ok"] = False
