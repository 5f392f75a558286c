"""``autosaved bench``: measurements side by side in one run, on a private daemon in a temp dir.

``autosaved bench [--size 1GiB] [--json]`` measures the data path (see :mod:`.data`);
``autosaved bench throttle [--size 512MiB] [--json]`` measures I/O politeness (see :mod:`.throttle`);
``autosaved bench incremental [--size 1GiB] [--json]`` measures what a save writes when 1% changed;
``autosaved bench remote [--size 1GiB] [--json]`` measures replication to object storage (see :mod:`.remote`);
``autosaved bench dcp [--size 256MiB] [--json]`` measures the trainer's stall per ``dcp.async_save`` (see :mod:`.dcp`);
``autosaved bench langgraph`` / ``autosaved bench hf``: the framework integrations (see :mod:`.langgraph`,
:mod:`.hf`);
``autosaved bench small [--json]`` measures small updates against their floors (see :mod:`.small`);
``autosaved bench jobs [--json]`` measures one job's latency beside 1,000 busy jobs (see :mod:`.jobs`);
``autosaved bench shapes [--json]`` measures one job's latency beside a job of 600,000 tiny maps (see :mod:`.shapes`);
``autosaved bench hash [--json]`` measures the chunk hash candidates (see :mod:`.hash`);
``autosaved bench train [--small] [--json]`` checkpoints every step of a training loop (see :mod:`.train`).
"""

from __future__ import annotations

import argparse
from typing import Any

from . import data, dcp, hash, hf, incremental, jobs, langgraph, remote, shapes, small, throttle, train

# Each mode once: its module (add_arguments, run) and its help line; no mode runs the data benchmark.
MODES: dict[str, tuple[Any, str]] = {
    "throttle": (throttle, "foreground I/O with and without throttling"),
    "incremental": (incremental, "bytes a save writes when 1%% changed"),
    "remote": (remote, "replication to an S3 store vs plain obstore loops"),
    "dcp": (dcp, "trainer stall per dcp.async_save, vs FileSystemWriter"),
    "langgraph": (langgraph, "LangGraph aput latency vs SQLite and memory"),
    "hf": (hf, "HF Trainer step time with and without checkpoints"),
    "small": (small, "small-update latency and throughput vs floors"),
    "jobs": (jobs, "one job's update latency alone vs beside 1,000 jobs updated once a second"),
    "shapes": (shapes, "one job's update latency alone vs beside a job of 600,000 tiny maps"),
    "hash": (hash, "chunk hash speed: SHA-256 vs BLAKE3"),
    "train": (train, "checkpoint every step of a GPT-2-shaped training loop"),
}


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="benchmark autosaved against the alternatives")
    data.add_arguments(p)
    modes = p.add_subparsers(dest="bench_mode", metavar="MODE", required=False)
    for name, (module, help_text) in MODES.items():
        module.add_arguments(modes.add_parser(name, help=help_text))


def run(args: argparse.Namespace) -> int:
    mode = MODES.get(args.bench_mode)
    code: int = (mode[0] if mode is not None else data).run(args)
    return code
