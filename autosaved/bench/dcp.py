"""``autosaved bench dcp [--size 256MiB] [--rounds 3] [--json]``: how long ``dcp.async_save`` blocks the
trainer through :class:`~autosaved.integrations.dcp.AutosavedStorageWriter`, side by side in one run with:

- ``fs_blocking_s``: DCP's own ``FileSystemWriter`` ``async_save`` of the same state into a temp dir
  (its default: ``cache_staged_state_dict=False``, so every save stages into fresh memory);
- ``fs_cached_blocking_s``: the same with ``cache_staged_state_dict=True`` (staging buffers reused; torch
  pins them, which needs an accelerator, so ``None`` on a CPU-only host);
- ``memcpy_s``: a plain copy of the shard into buffers that are already faulted in (the floor).

One process (world size 1: the rank's shard is the whole state), a private daemon in a temp dir. Every
figure is the median over ``--rounds`` saves after one warm-up save; each save is waited for (not timed)
before the next, so the figures are the trainer's stall per save, not the upload. The contenders
run interleaved, round by round, so a busy host's noise falls on all of them alike. ``*_upload_s`` is how
long the background part took, for context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ..config import parse_size
from ..errors import ConfigError
from ..fmt import human_bytes, table

LEAF_BYTES = 16 * 1024**2
_DAEMON_CONFIG = '[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="256MiB", help="the rank's shard size (default 256MiB)")
    p.add_argument("--rounds", type=int, default=3, help="timed saves per writer, after one warm-up (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _state(total: int) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    n, out = 0, {}
    while total - n * LEAF_BYTES >= 4:
        numel = min(LEAF_BYTES, total - n * LEAF_BYTES) // 4
        out[f"layer{n}.weight"] = torch.randn(numel, generator=gen)
        n += 1
    return out


def _timed(save: Callable[[], Any]) -> tuple[float, float]:
    """(seconds ``save()`` blocked, seconds until its future completed)."""
    t0 = time.perf_counter()
    fut = save()
    t1 = time.perf_counter()
    fut.result()
    return t1 - t0, time.perf_counter() - t0


def measure(size: int, rounds: int) -> dict[str, Any]:
    import torch
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import async_save

    from ..integrations.dcp import AutosavedStorageWriter
    from ..testing.private import PrivateDaemon

    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    warnings.filterwarnings("ignore", message=".*Detected an existing checkpoint.*")
    state = _state(size)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    dst = {k: torch.empty_like(v).fill_(0) for k, v in state.items()}  # faulted in: the floor's target

    def memcpy() -> Any:
        for k, v in state.items():
            dst[k].copy_(v)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    samples: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-dcp-") as tmp, PrivateDaemon(
            Path(tmp) / "daemon", config=_DAEMON_CONFIG) as daemon:
        writer = AutosavedStorageWriter("bench-dcp", address=daemon.address)
        contenders: dict[str, Callable[[], Any]] = {
            "autosaved": lambda: async_save(state, storage_writer=writer),
            "fs": lambda: async_save(state, storage_writer=FileSystemWriter(str(Path(tmp) / "fs"))),
            "memcpy": memcpy,
        }
        if torch.cuda.is_available():  # torch pins cached staging buffers, which needs an accelerator
            cached = FileSystemWriter(str(Path(tmp) / "fs_cached"), cache_staged_state_dict=True)
            contenders["fs_cached"] = lambda: async_save(state, storage_writer=cached)
        # Interleaved, so a busy host's noise falls on every contender alike; round 0 is the warm-up.
        for i in range(rounds + 1):
            for name, save in contenders.items():
                for t in state.values():
                    t.add_(1.0)  # a training step changed the weights: nobody may skip unchanged bytes
                got = _timed(save)
                if i:
                    samples.setdefault(name, []).append(got)
        version = writer.last_version
        writer.close()

    def med(name: str, which: int) -> float | None:
        return round(statistics.median(s[which] for s in samples[name]), 4) if name in samples else None

    result: dict[str, Any] = {"bytes": nbytes, "rounds": rounds, "autosaved_version": version,
                              "memcpy_s": med("memcpy", 0)}
    for name in ("autosaved", "fs", "fs_cached"):
        result[f"{name}_blocking_s"], result[f"{name}_upload_s"] = med(name, 0), med(name, 1)
    mine = result["autosaved_blocking_s"]
    for key, other in (("vs_fs", "fs_blocking_s"), ("vs_fs_cached", "fs_cached_blocking_s"), ("vs_memcpy", "memcpy_s")):
        result[key] = round(mine / result[other], 3) if result[other] else None
    return result


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    if not size or size < 4:
        raise ConfigError("--size must be at least 4 bytes")
    if args.rounds < 1:
        raise ConfigError("--rounds must be at least 1")
    try:
        import torch.distributed.checkpoint  # noqa: F401
    except ImportError:
        raise ConfigError("bench dcp needs torch (pip install 'autosaved[torch]')") from None
    result = measure(size, args.rounds)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"dcp.async_save of a {human_bytes(result['bytes'])} float32 shard, one rank; median of "
          f"{result['rounds']} saves after a warm-up")
    rows = [
        ["AutosavedStorageWriter", f"{result['autosaved_blocking_s']:.4f}", f"{result['autosaved_upload_s']:.3f}",
         "1.00"],
        ["FileSystemWriter", f"{result['fs_blocking_s']:.4f}", f"{result['fs_upload_s']:.3f}",
         f"{result['vs_fs']:.2f}"],
    ]
    if result["fs_cached_blocking_s"] is not None:
        rows.append(["FileSystemWriter (cached staging)", f"{result['fs_cached_blocking_s']:.4f}",
                     f"{result['fs_cached_upload_s']:.3f}", f"{result['vs_fs_cached']:.2f}"])
    rows += [
        ["memcpy into ready buffers", f"{result['memcpy_s']:.4f}", "-", f"{result['vs_memcpy']:.2f}"],
    ]
    print(table(rows, ["WRITER", "BLOCKED (s)", "UNTIL DURABLE (s)", "AUTOSAVED / THIS"]))
    return 0
