"""``autosaved bench``: measurements side by side in one run, on a private daemon in a temp dir.

``autosaved bench [--size 1GiB] [--json]`` measures the data path (see :mod:`.data`);
``autosaved bench throttle [--size 512MiB] [--json]`` measures I/O politeness (see :mod:`.throttle`);
``autosaved bench incremental [--size 1GiB] [--json]`` measures what a save writes when 1% changed;
``autosaved bench remote [--size 1GiB] [--json]`` measures replication to object storage (see :mod:`.remote`);
``autosaved bench dcp [--size 256MiB] [--json]`` measures the trainer's stall per ``dcp.async_save`` (see :mod:`.dcp`);
``autosaved bench langgraph`` / ``autosaved bench hf``: the framework integrations (see :mod:`.langgraph`,
:mod:`.hf`);
``autosaved bench small [--json]`` measures small updates against their floors (see :mod:`.small`);
``autosaved bench hash [--json]`` measures the chunk hash candidates (see :mod:`.hash`);
``autosaved bench train [--small] [--json]`` checkpoints every step of a training loop (see :mod:`.train`).
"""

from __future__ import annotations

import argparse
from typing import Any

from . import data, dcp, hash, hf, incremental, langgraph, remote, small, throttle, train


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="benchmark autosaved against the alternatives")
    data.add_arguments(p)
    modes = p.add_subparsers(dest="bench_mode", metavar="MODE", required=False)
    throttle.add_arguments(modes.add_parser("throttle", help="foreground I/O with and without throttling"))
    incremental.add_arguments(modes.add_parser("incremental", help="bytes a save writes when 1%% changed"))
    remote.add_arguments(modes.add_parser("remote", help="replication to an S3 store vs plain obstore loops"))
    dcp.add_arguments(modes.add_parser("dcp", help="trainer stall per dcp.async_save, vs FileSystemWriter"))
    langgraph.add_arguments(modes.add_parser("langgraph", help="LangGraph aput latency vs SQLite and memory"))
    hf.add_arguments(modes.add_parser("hf", help="HF Trainer step time with and without checkpoints"))
    small.add_arguments(modes.add_parser("small", help="small-update latency and throughput vs floors"))
    hash.add_arguments(modes.add_parser("hash", help="chunk hash speed: SHA-256 vs BLAKE3"))
    train.add_arguments(modes.add_parser("train", help="checkpoint every step of a GPT-2-shaped training loop"))


def run(args: argparse.Namespace) -> int:
    if args.bench_mode == "throttle":
        return throttle.run(args)
    if args.bench_mode == "incremental":
        return incremental.run(args)
    if args.bench_mode == "remote":
        return remote.run(args)
    if args.bench_mode == "dcp":
        return dcp.run(args)
    if args.bench_mode == "langgraph":
        return langgraph.run(args)
    if args.bench_mode == "hf":
        return hf.run(args)
    if args.bench_mode == "small":
        return small.run(args)
    if args.bench_mode == "hash":
        return hash.run(args)
    if args.bench_mode == "train":
        return train.run(args)
    return data.run(args)
