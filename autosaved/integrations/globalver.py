"""Global versions of multi-rank checkpoints: the record that ties every rank's part together. Pure: no
torch, no sockets, so the CLI (``list``, ``verify``) can use it without importing torch.

A multi-rank save is stored as

- one **part** per rank that had something to write: an ordinary autosaved job ``<job>.rank-<r>`` on that
  rank's own host daemon, whose state is ``{"dcp_part": {"token", "rank", "keys", "values"}}`` and whose
  version manifest carries ``meta = {"dcp_part": {"token", "rank", "hash"}}``;
- one **global version record**: a committed version of the job ``<job>`` itself on the coordinator's
  daemon, whose state is ``{"dcp": {"format", "token", "world_size", "parts", "metadata"}}`` and whose
  manifest carries ``meta = {"dcp": {"world_size", "parts"}}`` (so ``list`` shows it without loading it).

The record is committed only after every part it names was acknowledged at the requested level, so a
committed record never names a missing part, and a save that fails anywhere leaves no record at all.
``hash`` binds a part to its save: SHA-256 over the save's token, the rank and the layout of every item
(key, dtype, shape, size). The contents themselves are covered by the daemon's per-chunk SHA-256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..errors import CorruptVersion

RECORD_FORMAT: Final = 1
RECORD_KEY: Final = "dcp"
PART_KEY: Final = "dcp_part"


def part_job(job: str, rank: int) -> str:
    """The autosaved job that holds rank ``rank``'s part of ``job`` (a valid job name when ``job`` is)."""
    return f"{job}.rank-{rank}"


@dataclass(frozen=True)
class PartInfo:
    """One rank's committed part, as the global record names it."""

    rank: int
    job: str
    version: int
    hash: str
    address: str

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "job": self.job, "version": self.version, "hash": self.hash,
                "address": self.address}

    @classmethod
    def from_json(cls, raw: Any, where: str) -> PartInfo:
        try:
            return cls(rank=int(raw["rank"]), job=str(raw["job"]), version=int(raw["version"]),
                       hash=str(raw["hash"]), address=str(raw["address"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptVersion(f"{where}: malformed part entry {raw!r} ({exc})") from None


def item_layout(value: Any) -> list[Any]:
    """What the part hash covers of one stored item: its kind, dtype, shape and size, never its bytes."""
    if isinstance(value, bytes | bytearray | memoryview):
        return ["bytes", len(value)]
    dtype = str(getattr(value, "dtype", type(value).__name__)).removeprefix("torch.")
    shape = [int(n) for n in getattr(value, "shape", ())]
    return ["tensor", dtype, shape]


def part_hash(token: str, rank: int, keys: Sequence[str], values: Sequence[Any]) -> str:
    body = {"token": token, "rank": rank, "items": [[k, item_layout(v)] for k, v in zip(keys, values, strict=True)]}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_parts(parts: Iterable[PartInfo], token: str, tokens: Mapping[int, str]) -> list[PartInfo]:
    """The parts sorted by rank, or ``ValueError`` when one is missing its token, is from another save or
    a rank appears twice. ``tokens``: the token each rank's part says it was written for."""
    out: dict[int, PartInfo] = {}
    for part in parts:
        if part.rank in out and out[part.rank] != part:
            raise ValueError(f"rank {part.rank} reported two different parts")
        if tokens.get(part.rank) != token:
            raise ValueError(f"rank {part.rank}'s part belongs to another save "
                             f"(token {tokens.get(part.rank)!r}, expected {token!r})")
        out[part.rank] = part
    return [out[r] for r in sorted(out)]


def record_state(*, token: str, world_size: int, parts: Sequence[PartInfo], metadata: bytes) -> dict[str, Any]:
    """The state of the ``<job>`` job that one global version commits."""
    return {RECORD_KEY: {"format": RECORD_FORMAT, "token": token, "world_size": world_size,
                         "parts": [p.to_json() for p in parts], "metadata": metadata}}


def record_meta(*, world_size: int, parts: Sequence[PartInfo]) -> dict[str, Any]:
    """What the global version's manifest carries, for ``list`` and ``verify``."""
    return {RECORD_KEY: {"world_size": world_size, "parts": [p.to_json() for p in parts]}}


@dataclass(frozen=True)
class GlobalRecord:
    version: int
    token: str
    world_size: int
    parts: tuple[PartInfo, ...]
    metadata: bytes

    def part(self, rank: int) -> PartInfo:
        for p in self.parts:
            if p.rank == rank:
                return p
        raise CorruptVersion(f"global version {self.version} names no part for rank {rank}")


def parse_record(state: Any, version: int, where: str) -> GlobalRecord:
    """A restored ``<job>`` state → its record; ``CorruptVersion`` naming what is wrong."""
    rec = state.get(RECORD_KEY) if isinstance(state, Mapping) else None
    if not isinstance(rec, Mapping):
        raise CorruptVersion(f"{where} version {version} is not a global version (no {RECORD_KEY!r} record)")
    if rec.get("format") != RECORD_FORMAT:
        raise CorruptVersion(f"{where} version {version}: record format {rec.get('format')!r} is not supported")
    metadata = rec.get("metadata")
    if not isinstance(metadata, bytes | bytearray | memoryview):
        raise CorruptVersion(f"{where} version {version}: the record carries no metadata")
    parts = tuple(PartInfo.from_json(p, f"{where} version {version}") for p in rec.get("parts") or [])
    return GlobalRecord(version=version, token=str(rec.get("token")), world_size=int(rec.get("world_size", 0)),
                        parts=parts, metadata=bytes(metadata))


def is_global_row(row: Mapping[str, Any]) -> bool:
    meta = row.get("meta")
    return isinstance(meta, Mapping) and isinstance(meta.get(RECORD_KEY), Mapping)


def global_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]] | None:
    """``list JOB`` rows → one row per committed global version with ``id``, ``world_size`` and ``parts``
    (one entry per rank), or ``None`` when ``rows`` are not those of a global (multi-rank) job."""
    if not rows or not any(is_global_row(r) for r in rows):
        return None
    out = []
    for r in rows:
        if not is_global_row(r):
            continue  # a version written by something else under this name is not a global version
        rec = r["meta"][RECORD_KEY]
        out.append({**r, "world_size": rec.get("world_size"), "parts": rec.get("parts") or []})
    return out


def parts_summary(parts: Sequence[Mapping[str, Any]]) -> str:
    """``0:v3@ipc:///a.sock 1:v3@…`` for the human table."""
    return " ".join(f"{p.get('rank')}:v{p.get('version')}@{p.get('address')}" for p in parts)
