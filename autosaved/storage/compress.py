"""Optional zstd compression of stored chunks.

A chunk is always named and verified by the SHA-256 of its *raw* bytes, so a chunk dedups the same
whether it was stored compressed or not, and across versions written under different settings. The
stored form lives in the object's file name: ``objects/<ab>/<sha256>`` holds the raw bytes,
``objects/<ab>/<sha256>.zst`` one zstd frame of them. The form is a property of the object file, not of
a version: a later version that reuses the chunk (perhaps from a lazily loaded base whose bytes were
never read) need not know how it was stored, and manifests keep their format.

Modes (the per-job ``policy.compression`` setting):

``off``
    store every chunk raw.
``zstd``
    try every chunk.
``auto`` (the default)
    try chunks of bytes and integer/bool arrays, never float or complex ones: trained weights and
    optimizer moments are close to random in their low mantissa bits, so zstd rarely saves 10% on
    them and would cost CPU time on the largest leaves (see README, "Compression").

Either way a chunk is kept compressed only if that saves at least :data:`MIN_SAVING` of its size.
"""

from __future__ import annotations

import threading
from typing import Final

import zstandard

from ..settings import COMPRESSION_MODES as COMPRESSION_MODES  # declared with the policy.compression key
from ..tree import Blob

SUFFIX: Final = ".zst"
# Below this saving a chunk stays raw: a few percent is not worth a decompression on every restore,
# nor losing the zero-copy sendfile path.
MIN_SAVING: Final = 0.10
# Level 1, not zstd's default 3: measured on 8 MiB chunks (examples/measure_compression.py) it compressed
# 1.2-6x faster and stored the same or less (int64 token ids: 25% vs 33% of raw); see README, "Compression".
LEVEL: Final = 1

_TORCH_FLOAT_PREFIXES: Final = ("float", "bfloat", "complex")
# A ZstdCompressor/ZstdDecompressor must not be used by two threads at once; saves of different jobs and
# restores run in parallel worker threads, so each thread keeps its own.
_local = threading.local()


class ChunkDecodeError(ValueError):
    """A stored compressed chunk is not a valid zstd frame of the expected size."""


def is_float_blob(blob: Blob) -> bool:
    """Whether ``blob`` holds floating-point or complex numbers (numpy dtype ``<f4``/``<c8``…, torch
    ``float32``/``bfloat16``/``float8_*``/``complex64``…)."""
    if blob.kind == "bytes":
        return False
    if blob.kind == "torch":
        return blob.dtype.startswith(_TORCH_FLOAT_PREFIXES)
    return blob.dtype[1:2] in ("f", "c")


def worth_trying(blob: Blob, mode: str) -> bool:
    """Whether a save under ``mode`` should try to compress ``blob``'s chunks."""
    if mode == "zstd":
        return True
    if mode == "auto":
        return not is_float_blob(blob)
    return False


def compress_chunk(data: memoryview) -> bytes | None:
    """``data`` as one zstd frame, or ``None`` when that would not save :data:`MIN_SAVING`."""
    compressor: zstandard.ZstdCompressor | None = getattr(_local, "compressor", None)
    if compressor is None:
        compressor = _local.compressor = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True)
    packed = compressor.compress(data)
    return packed if len(packed) <= data.nbytes * (1 - MIN_SAVING) else None


def decompress_chunk(packed: bytes, size: int) -> bytes:
    """The raw bytes of a stored frame, which must be exactly ``size`` bytes long."""
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "decompressor", None)
    if decompressor is None:
        decompressor = _local.decompressor = zstandard.ZstdDecompressor()
    try:
        # Frames are written with their content size; checking it first means a corrupted header can
        # never make the decompressor allocate more than the manifest promises.
        declared = zstandard.frame_content_size(packed)
        if declared != size:
            raise ChunkDecodeError(f"frame declares {declared} bytes, its manifest records {size}")
        raw = decompressor.decompress(packed, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ChunkDecodeError(f"not a valid zstd frame ({exc})") from None
    if len(raw) != size:
        raise ChunkDecodeError(f"decompresses to {len(raw)} bytes, its manifest records {size}")
    return raw
