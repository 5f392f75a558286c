"""How much zstd saves, and what it costs, on the kinds of leaves a trainer checkpoints.

    python examples/measure_compression.py [--mib 16]

Part 1 compresses one 8 MiB chunk (the daemon's default chunk size) of each kind of data at zstd levels 1
and 3 and prints the stored size and the speeds. Part 2 saves one sample training state with
``policy.compression`` off, auto and zstd into a temp store and prints the bytes each save wrote.
Everything runs on this machine's CPU and disk; the numbers in the README came from this script.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from autosaved.codec import pack
from autosaved.storage.local import JobStore

CHUNK = 8 * 1024 * 1024


def datasets(nbytes: int) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    n4, n8 = nbytes // 4, nbytes // 8
    weights = (rng.standard_normal(n4) * 0.02).astype(np.float32)
    return {
        "float32 weights (normal, std 0.02)": weights.tobytes(),
        "float32 Adam exp_avg_sq (~g^2)": (weights**2 * 1e-3).astype(np.float32).tobytes(),
        "float16 weights": weights[: nbytes // 2].astype(np.float16).tobytes(),
        "int64 token ids (< 50257)": rng.integers(0, 50257, n8).tobytes(),
        "int32 token ids (< 50257)": rng.integers(0, 50257, n4, dtype=np.int32).tobytes(),
        "int64 positions/counters": (np.arange(n8, dtype=np.int64) // 3).tobytes(),
        "bool mask (5% set)": (rng.random(nbytes) < 0.05).tobytes(),
        "text log bytes": b"".join(b"step=%d loss=%.4f lr=3e-4\n" % (i, 1 / (i + 1)) for i in range(nbytes // 28))[
            :nbytes
        ],
    }


def timed(fn: Callable[[], Any], repeat: int = 3) -> tuple[Any, float]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def measure_codecs() -> None:
    print(f"{'data (one 8 MiB chunk)':38} {'level':>5} {'stored %':>9} {'compress MB/s':>14} {'decompress MB/s':>16}")
    for name, data in datasets(CHUNK).items():
        for level in (1, 3):
            cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
            packed, c_s = timed(lambda cctx=cctx, data=data: cctx.compress(data))
            _, d_s = timed(lambda dctx=dctx, packed=packed: dctx.decompress(packed))
            print(f"{name:38} {level:>5} {100 * len(packed) / len(data):>8.1f}% {len(data) / c_s / 1e6:>14.0f} "
                  f"{len(data) / d_s / 1e6:>16.0f}")


def measure_saves(mib: int) -> None:
    rng = np.random.default_rng(1)
    n = mib * 1024 * 1024
    state = {
        "model": {"w": (rng.standard_normal(n // 4) * 0.02).astype(np.float32)},
        "optim": {"exp_avg": (rng.standard_normal(n // 4) * 1e-3).astype(np.float32), "step": 1000},
        "data": {"buffer": rng.integers(0, 50257, n // 8), "positions": np.arange(n // 8) // 3},
        "log": b"".join(b"step=%d loss=%.4f\n" % (i, 1 / (i + 1)) for i in range(n // 20)),
    }
    print(f"\nsample state: float32 model + moment {2 * mib} MiB, int64 token buffer + positions {2 * mib} MiB, "
          f"text log ~{mib} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("off", "auto", "zstd"):
            js = JobStore(Path(tmp), 0, f"job-{mode}")
            t0 = time.perf_counter()
            result = js.write_version(pack(state), version=1, step=1, reason="measure", meta={}, sessions={},
                                      chunk_size=CHUNK, compression=mode)
            elapsed = time.perf_counter() - t0
            t0 = time.perf_counter()
            js.load(1)
            load_s = time.perf_counter() - t0
            print(f"compression={mode:5} bytes_written={result.bytes_written:>11,} "
                  f"({100 * result.bytes_written / result.info.bytes:5.1f}% of {result.info.bytes:,})  "
                  f"save {elapsed:.2f}s  load+verify {load_s:.2f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=16, help="size of each leaf group in the sample state")
    args = parser.parse_args()
    measure_codecs()
    measure_saves(args.mib)


if __name__ == "__main__":
    main()
