"""Version manifests: the record that makes a version exist.

A manifest is a JSON file ``versions/<id>.json`` that lists the version's metadata, the state tree (see
:mod:`autosaved.tree`) and, per binary leaf, its dtype, shape, size and the content-addressed chunks its
bytes live in. It ends with ``digest``, a SHA-256 over the rest, so a flipped byte in the manifest itself
is caught as surely as one in the data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from ..errors import CorruptVersion, StorageError
from ..tree import Blob, Chunk

FORMAT_VERSION: Final = 1
HASH_NAME: Final = "sha256"


class UnsupportedFormat(StorageError):
    """Stored data written by a newer autosaved (a higher format version). Never skipped as corrupt,
    never repaired, never collected: the caller stops and says to upgrade, and nothing is changed."""

    code = "unsupported_format"


def check_format(found: object, supported: int, what: str) -> None:
    """Refuse ``found`` when it is a format version newer than ``supported``."""
    if isinstance(found, int) and not isinstance(found, bool) and found > supported:
        raise UnsupportedFormat(f"{what} is format {found}, newer than this autosaved reads ({supported}); "
                                "upgrade autosaved to read it (nothing was changed)")


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def seal(body: dict[str, Any]) -> bytes:
    """Serialise a manifest body with its digest."""
    sealed = dict(body, digest=hashlib.sha256(_canonical(body)).hexdigest())
    return json.dumps(sealed, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False).encode() + b"\n"


def unseal(raw: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptVersion(f"{where}: manifest is not valid JSON ({exc})") from None
    if isinstance(doc, dict):
        # Before the digest: a newer format may seal differently, and must not look corrupt.
        check_format(doc.get("format"), FORMAT_VERSION, f"{where}: manifest")
    if not isinstance(doc, dict) or "digest" not in doc:
        raise CorruptVersion(f"{where}: manifest has no digest")
    digest = doc.pop("digest")
    if hashlib.sha256(_canonical(doc)).hexdigest() != digest:
        raise CorruptVersion(f"{where}: manifest digest does not match its contents")
    if doc.get("format") != FORMAT_VERSION:
        raise CorruptVersion(f"{where}: manifest format {doc.get('format')!r} is not supported")
    return doc


def blob_record(blob: Blob, chunks: tuple[Chunk, ...]) -> dict[str, Any]:
    return {**blob.descriptor(), "chunks": [[c.digest, c.size] for c in chunks]}


def blob_from_record(rec: Any, where: str) -> Blob:
    try:
        kind, dtype, shape, nbytes = Blob.check_descriptor(rec)
        chunks = tuple(Chunk(str(d), int(s)) for d, s in rec["chunks"])
    except Exception as exc:
        raise CorruptVersion(f"{where}: bad blob record ({exc})") from None
    if sum(c.size for c in chunks) != nbytes:
        raise CorruptVersion(f"{where}: chunk sizes do not add up to the blob size")
    return Blob(kind=kind, dtype=dtype, shape=shape, nbytes=nbytes, chunks=chunks)


@dataclass(frozen=True)
class VersionInfo:
    """What ``list`` shows about one version."""

    job: str
    id: int
    step: int | None
    time: str
    bytes: int
    reason: str
    meta: dict[str, Any]
    ok: bool = True
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "id": self.id,
            "step": self.step,
            "time": self.time,
            "bytes": self.bytes,
            "reason": self.reason,
            "meta": self.meta,
            "ok": self.ok,
            "error": self.error,
        }


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
