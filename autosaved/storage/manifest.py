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
from ..tree import Blob, Chunk, from_node
from . import hashing

FORMAT_VERSION: Final = 1
# Format 2: a root record over a tree of pages (paged.py). Readers take both; a higher one is refused.
READ_FORMATS: Final = (1, 2)
# The hash that names new chunks; a manifest records it (``hash``), see hashing.py.
HASH_NAME: Final = hashing.DEFAULT


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
        check_format(doc.get("format"), max(READ_FORMATS), f"{where}: manifest")
    if not isinstance(doc, dict) or "digest" not in doc:
        raise CorruptVersion(f"{where}: manifest has no digest")
    digest = doc.pop("digest")
    if hashlib.sha256(_canonical(doc)).hexdigest() != digest:
        raise CorruptVersion(f"{where}: manifest digest does not match its contents")
    if doc.get("format") not in READ_FORMATS:
        raise CorruptVersion(f"{where}: manifest format {doc.get('format')!r} is not supported")
    return doc


def blob_record(blob: Blob, chunks: tuple[Chunk, ...], default_hash: str = HASH_NAME) -> dict[str, Any]:
    """A leaf's manifest record; it names its chunks' hash only where that is not the manifest's."""
    rec = {**blob.descriptor(), "chunks": [[c.digest, c.size] for c in chunks]}
    algos = {c.hash for c in chunks}
    if len(algos) > 1:  # never built: a leaf's chunks come from one hashing pass or one stored leaf
        raise ValueError("a leaf's chunks are named by more than one hash algorithm")
    if algos and (algo := algos.pop()) != default_hash:
        rec["hash"] = algo
    return rec


def blob_from_record(rec: Any, where: str, default_hash: str = hashing.LEGACY) -> Blob:
    """A stored leaf; ``default_hash`` is the manifest's ``hash`` (SHA-256 for manifests without one)."""
    try:
        kind, dtype, shape, nbytes = Blob.check_descriptor(rec)
        algo = rec.get("hash", default_hash)
        chunks = tuple(Chunk(str(d), int(s), algo) for d, s in rec["chunks"])
    except Exception as exc:
        raise CorruptVersion(f"{where}: bad blob record ({exc})") from None
    hashing.hasher(algo, where)  # an unknown algorithm is reported when the manifest is read
    if sum(c.size for c in chunks) != nbytes:
        raise CorruptVersion(f"{where}: chunk sizes do not add up to the blob size")
    return Blob(kind=kind, dtype=dtype, shape=shape, nbytes=nbytes, chunks=chunks)


def tree_from_manifest(doc: dict[str, Any], where: str) -> tuple[Any, list[Blob]]:
    """The state tree a manifest describes and its stored leaves (no bytes yet), for every store that
    reads manifests (local and remote); anything unreadable is a ``CorruptVersion`` naming ``where``."""
    try:
        blobs = [blob_from_record(rec, where, doc.get("hash", hashing.LEGACY)) for rec in doc["blobs"]]
        return from_node(doc["tree"], blobs), blobs
    except CorruptVersion:
        raise
    except Exception as exc:
        raise CorruptVersion(f"{where}: unreadable state tree ({exc})") from None


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
