"""``autosaved bench``: measurements side by side in one run, on a private daemon in a temp dir.

``autosaved bench [--size 1GiB] [--json]`` measures the data path (see :mod:`.bench_data`);
``autosaved bench throttle [--size 512MiB] [--json]`` measures I/O politeness (see :mod:`.bench_throttle`);
``autosaved bench incremental [--size 1GiB] [--json]`` measures what a save writes when 1% changed.
``autosaved bench small [--json]`` measures small updates against their floors (see :mod:`.bench_small`).
``autosaved bench hash [--json]`` measures the chunk hash candidates (see :mod:`.bench_hash`).
``autosaved bench train [--small] [--json]`` checkpoints every step of a training loop (see :mod:`.bench_train`).
"""

from __future__ import annotations

import argparse
from typing import Any

from . import bench_data, bench_hash, bench_incremental, bench_small, bench_throttle, bench_train


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="benchmark autosaved against the alternatives")
    bench_data.add_arguments(p)
    modes = p.add_subparsers(dest="bench_mode", metavar="MODE", required=False)
    bench_throttle.add_arguments(modes.add_parser("throttle", help="foreground I/O with and without throttling"))
    bench_incremental.add_arguments(modes.add_parser("incremental", help="bytes a save writes when 1%% changed"))
    bench_small.add_arguments(modes.add_parser("small", help="small-update latency and throughput vs floors"))
    bench_hash.add_arguments(modes.add_parser("hash", help="chunk hash speed: SHA-256 vs BLAKE3"))
    bench_train.add_arguments(modes.add_parser("train", help="checkpoint every step of a GPT-2-shaped training loop"))


def run(args: argparse.Namespace) -> int:
    if args.bench_mode == "throttle":
        return bench_throttle.run(args)
    if args.bench_mode == "incremental":
        return bench_incremental.run(args)
    if args.bench_mode == "small":
        return bench_small.run(args)
    if args.bench_mode == "hash":
        return bench_hash.run(args)
    if args.bench_mode == "train":
        return bench_train.run(args)
    return bench_data.run(args)
