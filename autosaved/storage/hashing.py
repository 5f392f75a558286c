"""Chunk hash algorithms: which one names new chunks, and how to check a chunk named by any of them.

Chosen by measurement (``autosaved bench hash``, issue 14): on the 2-core bench host BLAKE3 (SIMD) beat
SHA-256 (with the CPU's SHA extensions) in every run, 2.8 vs 1.5 GB/s per core when the host was idle, and
like ``hashlib`` it releases the GIL, so the writer's hash pool keeps both cores busy. Stores written before keep their
SHA-256 names: a manifest says which algorithm named its chunks (``hash``, per manifest, and per leaf
where a leaf kept chunks from an older version), and readers verify with that one. Both names are 64 hex
digits, so object paths look the same; the same bytes under two algorithms are two objects, written once
each (the first save after the switch rewrites leaves the client sends again; leaves the daemon only
holds by reference keep their old chunks).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

import blake3

from ..errors import CorruptVersion

SHA256: Final = "sha256"
BLAKE3: Final = "blake3"
# Manifests from before the field existed named their chunks with SHA-256.
LEGACY: Final = SHA256
DEFAULT: Final = BLAKE3


def _sha256(data: memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _blake3(data: memoryview) -> str:
    # One thread per call: the writer already hashes several chunks at once in its pool.
    return blake3.blake3(data).hexdigest()


HASHERS: Final[dict[str, Callable[[memoryview], str]]] = {SHA256: _sha256, BLAKE3: _blake3}


def hasher(name: object, where: str) -> Callable[[memoryview], str]:
    """The hex-digest function of algorithm ``name``; ``CorruptVersion`` naming ``where`` if unknown."""
    fn = HASHERS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise CorruptVersion(f"{where}: unknown chunk hash algorithm {name!r} (known: {', '.join(HASHERS)})")
    return fn
