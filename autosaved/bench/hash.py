"""``autosaved bench hash [--size 256MiB] [--json]``: the chunk hash candidates on this host, in GB/s.

How :mod:`autosaved.storage.hashing` chose its default: each algorithm hashes ``--size`` of random bytes
in 8 MiB chunks (the default ``chunk_size``) on one thread and on the writer's two-thread pool, beside a
memcpy of the same bytes. A hash that keeps up with the disk on one core leaves the other to the writes.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import parse_size
from ..errors import ConfigError
from ..fmt import print_json, table
from ..storage.hashing import HASHERS

CHUNK = 8 * 1024**2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="256MiB", help="bytes to hash (default 256MiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def measure(size: int) -> dict[str, Any]:
    data = memoryview(bytearray(os.urandom(min(size, 1 << 20)) * max(1, size // (1 << 20))))
    pieces = [data[i : i + CHUNK] for i in range(0, data.nbytes, CHUNK)]
    out: dict[str, Any] = {"bytes": data.nbytes}
    dest = bytearray(data.nbytes)
    dest[:] = data  # fault the destination in first
    t = time.perf_counter()
    dest[:] = data
    out["memcpy_gbps"] = data.nbytes / (time.perf_counter() - t) / 1e9
    with ThreadPoolExecutor(2) as pool:
        for name, fn in HASHERS.items():
            t = time.perf_counter()
            for p in pieces:
                fn(p)
            out[f"{name}_1_gbps"] = data.nbytes / (time.perf_counter() - t) / 1e9
            t = time.perf_counter()
            list(pool.map(fn, pieces))
            out[f"{name}_2_gbps"] = data.nbytes / (time.perf_counter() - t) / 1e9
    return out


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    if size is None or size < CHUNK:
        raise ConfigError("--size: expected at least 8MiB")
    result = measure(size)
    if args.json:
        print_json(result)
        return 0
    rows = [[k.removesuffix("_gbps"), f"{v:.2f}"] for k, v in result.items() if k.endswith("_gbps")]
    print(f"chunk hashes over {result['bytes'] >> 20} MiB in 8 MiB chunks (_1: one thread, _2: two threads)")
    print(table(rows, ["measure", "GB/s"]))
    return 0
