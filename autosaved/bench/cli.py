"""``autosaved bench``: measurements side by side in one run, on a private daemon in a temp dir.

``autosaved bench [--size 1GiB] [--json]`` measures the data path (see :mod:`.data`);
``autosaved bench throttle [--size 512MiB] [--json]`` measures I/O politeness (see :mod:`.throttle`);
``autosaved bench incremental [--size 1GiB] [--json]`` measures what a save writes when 1% changed;
``autosaved bench remote [--size 1GiB] [--json]`` measures replication to object storage (see :mod:`.remote`);
``autosaved bench dcp [--size 256MiB] [--json]`` measures the trainer's stall per ``dcp.async_save`` (see :mod:`.dcp`);
``autosaved bench history [--checkpoints 10000]``: costs as one agent thread's history grows (see :mod:`.history`);
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
import signal
import sys
from typing import Any

from . import data, dcp, hash, hf, history, incremental, jobs, langgraph, remote, shapes, small, throttle, train

# Each mode once: its module (add_arguments, run) and its help line; no mode runs the data benchmark.
MODES: dict[str, tuple[Any, str]] = {
    "throttle": (throttle, "foreground I/O with and without throttling"),
    "incremental": (incremental, "bytes a save writes when 1%% changed"),
    "remote": (remote, "replication to an S3 store vs plain obstore loops"),
    "dcp": (dcp, "trainer stall per dcp.async_save, vs FileSystemWriter"),
    "langgraph": (langgraph, "LangGraph aput latency vs SQLite and memory"),
    "history": (history, "one LangGraph thread filled to 1,000-100,000 checkpoints: put, save, get, RSS"),
    "hf": (hf, "HF Trainer step time with and without checkpoints"),
    "small": (small, "small-update latency and throughput vs floors"),
    "jobs": (jobs, "one job's update latency alone vs beside 1,000 jobs updated once a second"),
    "shapes": (shapes, "one job's update latency alone vs beside a job of 600,000 tiny maps"),
    "hash": (hash, "chunk hash speed: SHA-256 vs BLAKE3"),
    "train": (train, "checkpoint every step of a GPT-2-shaped training loop"),
}


# Per mode (``None``: the data benchmark): every option's dest → (its default, its type), filled in by
# ``run`` for options given nowhere. Options may stand before or after the mode (issue 22: ``bench --size
# 16MiB hash`` measured 256 MiB, the mode's default silently replacing the value given before it).
_DEFAULTS: dict[str | None, dict[str, tuple[Any, Any]]] = {}
# The options the bench parser itself takes (before a mode): dest → option string, for the error message.
_BEFORE: dict[str, str] = {}


def _defer_defaults(p: argparse.ArgumentParser, mode: str | None) -> None:
    """Let ``run`` apply the defaults, so a parser for a mode never overwrites what stood before it."""
    defaults = _DEFAULTS.setdefault(mode, {})
    for action in p._actions:
        if action.dest in ("help", argparse.SUPPRESS) or isinstance(action, argparse._SubParsersAction):
            continue
        defaults[action.dest] = (action.default, action.type)
        action.default = argparse.SUPPRESS


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="benchmark autosaved against the alternatives")
    data.add_arguments(p)
    _defer_defaults(p, None)
    _BEFORE.update({a.dest: a.option_strings[-1] for a in p._actions if a.option_strings and a.dest != "help"})
    modes = p.add_subparsers(dest="bench_mode", metavar="MODE", required=False)
    for name, (module, help_text) in MODES.items():
        mp = modes.add_parser(name, help=help_text)
        module.add_arguments(mp)
        _defer_defaults(mp, name)


def resolve(args: argparse.Namespace) -> str | None:
    """Apply the chosen mode's defaults to the options given nowhere; the error for an option given before
    the mode that the mode does not take (``None``: all is well)."""
    mode = getattr(args, "bench_mode", None)
    defaults = _DEFAULTS.get(mode, {})
    for dest, option in _BEFORE.items():
        if hasattr(args, dest) and dest not in defaults:
            return f"{option} does not apply to `autosaved bench {mode}`"
    for dest, (default, kind) in defaults.items():
        if not hasattr(args, dest):
            if isinstance(default, str) and kind is not None:
                default = kind(default)
            setattr(args, dest, default)
    return None


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    error = resolve(args)
    if error is not None:
        print(f"autosaved bench: error: {error}", file=sys.stderr)
        return 2
    # A benchmark stopped with SIGTERM (a CI timeout, ``kill``) unwinds like one stopped with Ctrl-C: its
    # private daemons and temp dirs are cleaned up (the default action left the daemon running).
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    mode = MODES.get(args.bench_mode)
    code: int = (mode[0] if mode is not None else data).run(args)
    return code
