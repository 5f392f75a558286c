"""``autosaved bench [--size 1GiB] [--json]``: the data path against what users would otherwise do.

One run, one host, one state (a dict of float32 arrays totalling ``--size``), side by side:

- ``memcpy_s``: one in-process copy of the state into memory already faulted in (the floor for how long a
  trainer must stop to hand its state to anyone);
- ``update_blocking_s``: how long ``Client.update()`` blocks (ack ``accepted``), median of 5;
- ``torch_save_s``: ``torch.save`` of the same tensors plus fsync (``None`` without torch);
- ``dcp_async_blocking_s``: how long ``torch.distributed.checkpoint.async_save`` blocks, one process
  (``None`` where unavailable);
- ``persist_s`` / ``raw_write_s``: the daemon committing a version of new bytes vs ``write`` + ``fsync`` of
  the same bytes into the same directory;
- ``restore_s`` / ``raw_read_s``: ``Client.restore`` of that version vs reading the bytes back, both after
  dropping the files' pages from the page cache (``POSIX_FADV_DONTNEED``) so both read the disk.

The four I/O measures are medians of 3 rounds, each running its pair back to back.

It runs its own private daemon in a temp dir; it never touches the user's daemon or state.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..client.admin import Admin
from ..client.sync import Client
from ..config import parse_size
from ..errors import ConfigError
from ..fmt import Stages, human_bytes, print_json, table
from ..storage.fsutil import read_exact, write_fsync
from ..testing.private import PrivateDaemon

KEYS = ("memcpy_s", "update_blocking_s", "torch_save_s", "dcp_async_blocking_s", "persist_s", "raw_write_s",
        "restore_s", "raw_read_s")
LEAF_BYTES = 64 * 1024**2
REPEATS = 5
IO_ROUNDS = 3
# Nothing saves on its own during the run: each measurement sees exactly the work it names.
# Unthrottled, as the persist_s target is stated; float data is never compressed under "auto".
_DAEMON_CONFIG = ('[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'
                  '[throttle]\nenabled = false\n')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="1GiB", help="total state size (default 1GiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def make_state(total: int, seed: int = 0) -> dict[str | int, np.ndarray[Any, Any]]:
    """float32 arrays of at most 64 MiB each, totalling ``total`` bytes (rounded down to 4)."""
    rng = np.random.default_rng(seed)
    state: dict[str | int, np.ndarray[Any, Any]] = {}
    floats, i = total // 4, 0
    while floats > 0:
        n = min(floats, LEAF_BYTES // 4)
        state[f"layer{i:04d}"] = rng.standard_normal(n, dtype=np.float32)
        floats -= n
        i += 1
    return state


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _median(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    return statistics.median(_timed(fn) for _ in range(repeats))


def _memcpy_s(state: dict[str | int, np.ndarray[Any, Any]]) -> float:
    dest = {k: np.empty_like(v) for k, v in state.items()}
    for k, v in state.items():
        np.copyto(dest[k], v)  # fault the destination in first: the floor is the copy, not the faults

    def copy() -> None:
        for k, v in state.items():
            np.copyto(dest[k], v)

    return _median(copy)


def _drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _torch_save_s(state: dict[str | int, np.ndarray[Any, Any]], directory: Path) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    path = directory / "torch_save.pt"

    def save() -> None:
        with path.open("wb") as fh:
            torch.save(tensors, fh)
            fh.flush()
            os.fsync(fh.fileno())

    took = _timed(save)
    path.unlink()
    return took


def _dcp_async_blocking_s(state: dict[str | int, np.ndarray[Any, Any]], directory: Path) -> float | None:
    try:
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return None
    if not hasattr(dcp, "async_save") or not dist.is_available():
        return None
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    own_group = not dist.is_initialized()
    if own_group:
        # async_save stages through a process group; a one-process gloo group over a file store is enough.
        dist.init_process_group("gloo", init_method=f"file://{directory / 'pg'}", rank=0, world_size=1)
    try:
        times = []
        for i in range(3):
            started = time.perf_counter()
            future = dcp.async_save(tensors, checkpoint_id=str(directory / f"dcp{i}"))
            times.append(time.perf_counter() - started)
            future.result()
        return statistics.median(times)
    finally:
        if own_group:
            dist.destroy_process_group()


def measure(total: int, work_dir: Path) -> dict[str, Any]:
    state = make_state(total)
    nbytes = sum(v.nbytes for v in state.values())
    out: dict[str, Any] = {"bytes": nbytes, "host": f"{socket.gethostname()} ({os.cpu_count()} cpus)"}
    stage = Stages("data")
    stage("memcpy")
    out["memcpy_s"] = _memcpy_s(state)
    stage("starting a private daemon")
    with PrivateDaemon(work_dir / "daemon", config=_DAEMON_CONFIG) as daemon, \
            Client("bench", address=daemon.address, save_timeout=3600) as client, \
            Admin(address=daemon.address) as admin:
        stage("update (the trainer's stall)")
        out["update_blocking_s"] = _median(lambda: client.update(state))
        rss = [admin.status()["daemon"]["rss_bytes"]]
        raw = daemon.state_dir / "raw.bin"
        persist, raw_write, restore, raw_read = [], [], [], []
        # Disks on shared hosts swing: each pair runs back to back, IO_ROUNDS times, and medians are kept.
        for round_ in range(IO_ROUNDS):
            stage(f"round {round_ + 1}/{IO_ROUNDS}: save")
            fresh = make_state(total, seed=round_ + 1)  # bytes the store has never seen: the save writes all
            client.update(fresh)
            persist.append(_timed(client.save))
            # After a save the daemon has read every slot page, so they count in its RSS: the worst case.
            rss.append(admin.status()["daemon"]["rss_bytes"])
            version = client.save()
            raw.unlink(missing_ok=True)
            pieces = [v.data for v in fresh.values()]
            raw_write.append(_timed(functools.partial(write_fsync, raw, pieces, drop_cache=True)))
            del fresh, pieces
            stage(f"round {round_ + 1}/{IO_ROUNDS}: restore")
            objects = [p for p in (daemon.state_dir / "jobs").rglob("objects/*/*") if p.is_file()]
            _drop_cache([*objects, raw])
            restore.append(_timed(functools.partial(client.restore, version)))
            # A fresh buffer, as restore gets: both pay for faulting in new memory.
            raw_read.append(_timed(lambda: read_exact(raw, nbytes, memoryview(bytearray(nbytes)))))
        raw.unlink()
        out["_daemon_rss"] = max(rss)
        for key, times in (("persist_s", persist), ("raw_write_s", raw_write), ("restore_s", restore),
                           ("raw_read_s", raw_read)):
            out[key] = statistics.median(times)
    stage("torch.save")
    out["torch_save_s"] = _torch_save_s(state, work_dir)
    stage("DCP async_save")
    out["dcp_async_blocking_s"] = _dcp_async_blocking_s(state, work_dir)
    stage.done()
    return {"bytes": out["bytes"], "host": out["host"], **{k: out[k] for k in KEYS}, "_daemon_rss": out["_daemon_rss"]}


def missing_rows(result: dict[str, Any]) -> dict[str, str]:
    """Why a row has no figure: the package it needs (issue 22: the table showed a bare "-")."""
    torch = importlib.util.find_spec("torch") is not None
    out = {}
    if result.get("torch_save_s") is None:
        out["torch_save_s"] = "not measured: needs torch (pip install 'autosaved[torch]')"
    if result.get("dcp_async_blocking_s") is None:
        out["dcp_async_blocking_s"] = ("not measured: needs torch (pip install 'autosaved[torch]')" if not torch else
                                       "not measured: this torch has no torch.distributed.checkpoint.async_save")
    return out


def render(result: dict[str, Any], daemon_rss: int | None = None) -> str:
    def r(a: str, b: str) -> float | None:
        x, y = result.get(a), result.get(b)
        return x / y if isinstance(x, float) and isinstance(y, float) and y > 0 else None

    def fmt(parts: list[tuple[float | None, str]]) -> str:
        return "; ".join(f"{v:.2f}x {label}" for v, label in parts if v is not None) or ""

    notes = {
        "update_blocking_s": fmt([(r("update_blocking_s", "memcpy_s"), "memcpy_s"),
                                  (r("update_blocking_s", "torch_save_s"), "torch_save_s"),
                                  (r("update_blocking_s", "dcp_async_blocking_s"), "dcp_async_blocking_s")]),
        "persist_s": fmt([(r("persist_s", "raw_write_s"), "raw_write_s")]),
        "restore_s": fmt([(r("restore_s", "raw_read_s"), "raw_read_s")]),
    }
    for key, why in missing_rows(result).items():
        notes[key] = why
    rows = [[k, "-" if result[k] is None else f"{result[k]:.4f}", notes.get(k, "")] for k in KEYS]
    lines = [f"autosaved bench: {human_bytes(result['bytes'])} of float32 arrays on {result['host']}",
             table(rows, ["measure", "seconds", "ratio"])]
    if daemon_rss is not None:
        lines.append(f"daemon peak RSS holding the state and saving it: {human_bytes(daemon_rss)} "
                     f"({daemon_rss / result['bytes']:.2f}x the state; shared slot pages included)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    total = parse_size(args.size, "--size")
    if total is None or total < 4:
        raise ConfigError("--size: expected a size of at least 4 bytes, like 64MiB or 1GiB")
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-") as tmp:
        result = measure(total, Path(tmp))
    rss = result.pop("_daemon_rss")
    if args.json:
        if missing := missing_rows(result):
            result["not_measured"] = missing
        print_json(result)
    else:
        print(render(result, rss))
    return 0
