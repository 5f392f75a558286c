"""``autosaved bench throttle``: does a background save leave the trainer's own I/O alone?

Two private daemons in one temp dir (same disk): one with ``[throttle] enabled = false``, one with the
default throttle. A foreground workload runs in its own process on that disk: a logger that appends
256 KiB and ``fdatasync``s, as fast as it can (``--fg write``, default), or a data loader that reads a
file sequentially in 1 MiB blocks with its pages dropped each pass (``--fg read``). Each round measures
three conditions in rotating order (the machine is noisy, so conditions interleave):

- **alone**: the workload with no save, over ``--window`` seconds;
- **unthrottled** / **throttled**: the workload while one daemon commits ``--size`` of fresh state
  (every chunk new, so nothing is deduplicated) in a *background* save (the job's ``dirty_bytes`` rule
  fires), measured over the save;
- **waited**: the same on the throttled daemon, but a save someone waits for (``save()``): it must run
  at full speed whatever the traffic (issue 21), so it is compared with
- **raw**: ``write`` + ``fsync`` of the same bytes into the same directory, under the same traffic.

The workload starts ``--warmup`` seconds before the save, so the sampler has seen it. Reported: medians
over rounds of the workload's throughput (MB/s, 10^6 bytes) and p99 operation latency, and of the save
times. Target: throttled keeps ≥ 85 % of the alone throughput and p99 ≤ 1.5 times alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..client.admin import Admin
from ..client.sync import Client
from ..config import parse_duration, parse_size
from ..errors import ConfigError
from ..fmt import print_json
from ..storage.fsutil import write_fsync
from ..testing.private import PrivateDaemon

CONDITIONS = ("alone", "unthrottled", "throttled", "waited", "raw")
SAVES = ("unthrottled", "throttled", "waited", "raw")
# The big update never saves by itself; the small one that follows it (after the warm-up) turns the job's
# dirty_bytes rule on, so the daemon starts a background save at that moment.
HOLD, FIRE = {"dirty_bytes": "off"}, {"dirty_bytes": "1MiB"}
# compression off: the checkpoint is random int64, which "auto" would try (and fail) to compress on every
# chunk; the benchmark measures the disk and the throttle, not zstd, and its numbers predate compression.
POLICY = ('[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\nkeep_last = 1\n'
          'compression = "off"\n')
WRITE_OP = 256 * 1024
READ_OP = 1024 * 1024
READ_FILE = 256 * 1024 * 1024
WRAP = 64 * 1024 * 1024  # the logger rewinds here, so the benchmark's disk use stays bounded


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="512MiB", help="state saved per condition (default 512MiB)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the conditions (default 3)")
    p.add_argument("--fg", choices=["write", "read"], default="write", help="foreground workload (default write)")
    p.add_argument("--window", default="3s", help="how long 'alone' is measured (default 3s)")
    p.add_argument("--warmup", default="1s", help="workload runs this long before a save starts (default 1s)")
    p.add_argument("--dir", type=Path, help="where daemons and workload put their files (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


# -- the foreground workload (runs in its own process) ----------------------------------------------


def foreground(mode: str, path: str, stop_file: str) -> None:
    """Run until ``stop_file`` exists; print ``[[t_end, latency_s], ...]`` (monotonic clock) as JSON."""
    ops: list[tuple[float, float]] = []
    if mode == "write":
        block = os.urandom(WRITE_OP)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        pos = 0
        while not os.path.exists(stop_file):
            t0 = time.monotonic()
            os.pwrite(fd, block, pos)
            os.fdatasync(fd)
            t1 = time.monotonic()
            ops.append((t1, t1 - t0))
            pos = (pos + WRITE_OP) % WRAP
    else:
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        pos = 0
        while not os.path.exists(stop_file):
            if pos == 0:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # every pass reads from the disk
            t0 = time.monotonic()
            got = len(os.pread(fd, READ_OP, pos))
            t1 = time.monotonic()
            ops.append((t1, t1 - t0))
            pos = pos + got if got and pos + got < size else 0
    os.close(fd)
    json.dump(ops, sys.stdout)


class Workload:
    def __init__(self, workdir: Path, mode: str) -> None:
        self.mode = mode
        self.path = workdir / f"foreground.{mode}"
        self.stop_file = workdir / "foreground.stop"
        self.op_bytes = WRITE_OP if mode == "write" else READ_OP
        if mode == "read" and not self.path.exists():
            with self.path.open("wb") as fh:
                for _ in range(READ_FILE // (1024 * 1024)):
                    fh.write(os.urandom(1024 * 1024))
                fh.flush()
                os.fsync(fh.fileno())
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.stop_file.unlink(missing_ok=True)
        code = "import sys; from autosaved.bench.throttle import foreground; foreground(*sys.argv[1:])"
        self.proc = subprocess.Popen([sys.executable, "-c", code, self.mode, str(self.path), str(self.stop_file)],
                                     stdout=subprocess.PIPE, text=True)

    def stop(self) -> list[tuple[float, float]]:
        assert self.proc is not None
        self.stop_file.touch()
        out, _ = self.proc.communicate(timeout=60)
        if self.proc.returncode != 0:
            raise RuntimeError(f"the foreground workload failed with exit code {self.proc.returncode}")
        return [(float(t), float(lat)) for t, lat in json.loads(out)]


def window_stats(ops: list[tuple[float, float]], start: float, end: float, op_bytes: int) -> dict[str, float]:
    """Throughput and p99 latency of the operations overlapping [start, end]. An operation counts with the
    share of its duration inside the window: an unthrottled save can be shorter than one fsync of the
    workload, and counting only operations that ended inside would then report nothing."""
    span = max(1e-6, end - start)
    done = 0.0
    lats = []
    for t_end, lat in ops:
        t_start = t_end - lat
        overlap = min(end, t_end) - max(start, t_start)
        if overlap > 0 or start <= t_end <= end:
            done += op_bytes * (overlap / lat if lat > 0 else 1.0)
            lats.append(lat)
    lats.sort()
    p99 = lats[min(len(lats) - 1, int(0.99 * len(lats)))] if lats else float("nan")
    return {"mbps": done / span / 1e6, "p99_ms": p99 * 1000, "ops": len(lats), "s": span}


# -- the benchmark ----------------------------------------------------------------------------------


class StateMaker:
    """Fresh state of ``size`` bytes per save without generating random data each time: one random base,
    and a unique stamp at the start of every chunk so each save's chunks hash differently."""

    def __init__(self, size: int, chunk: int = 8 * 1024 * 1024) -> None:
        self.base = np.random.default_rng(0).integers(0, 2**63, size // 8, dtype=np.int64)
        self.stride = chunk // 8
        self.serial = 0

    def next(self) -> np.ndarray:
        self.serial += 1
        self.base[:: self.stride] = np.arange(len(self.base[:: self.stride]), dtype=np.int64) + self.serial * 2**32
        return self.base


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size") or 0
    window = parse_duration(args.window, "--window") or 0.0
    warmup = parse_duration(args.warmup, "--warmup") or 0.0
    if size < 8 or args.rounds < 1:
        raise ConfigError("--size must be at least 8 bytes and --rounds at least 1")
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    root = Path(tempfile.mkdtemp(prefix="autosaved-bench-throttle-", dir=args.dir))
    daemons = {
        "unthrottled": PrivateDaemon(root / "unthrottled", config=POLICY + "[throttle]\nenabled = false\n"),
        "throttled": PrivateDaemon(root / "throttled", config=POLICY),
    }
    results: dict[str, list[dict[str, float]]] = {c: [] for c in CONDITIONS}
    saves: dict[str, list[float]] = {c: [] for c in SAVES}
    try:
        for d in daemons.values():
            d.start()
        workload = Workload(root, args.fg)
        maker = StateMaker(size)
        clients = {name: Client("bench", address=d.address, timeout=60, policy=HOLD) for name, d in daemons.items()}
        firing = {name: Client("bench", address=d.address, timeout=60, policy=FIRE) for name, d in daemons.items()}
        admins = {name: Admin(address=d.address, timeout=60) for name, d in daemons.items()}
        say(f"bench throttle: {args.rounds} rounds, {args.fg} workload, save size {size / 2**20:.0f} MiB, in {root}")
        for r in range(args.rounds):
            k = r % len(CONDITIONS)
            for cond in CONDITIONS[k:] + CONDITIONS[:k]:
                daemon = "throttled" if cond == "waited" else cond
                if cond in ("unthrottled", "throttled", "waited"):
                    clients[daemon].update({"x": maker.next()})  # over the wire before the workload starts
                raw = maker.next() if cond == "raw" else None
                workload.start()
                time.sleep(warmup)
                start = time.monotonic()
                if cond == "alone":
                    time.sleep(window)
                elif cond == "raw":
                    assert raw is not None
                    path = root / "raw.bin"
                    write_fsync(path, [raw.data.cast("B")])
                    path.unlink()
                elif cond == "waited":
                    clients[daemon].save()
                else:
                    _background_save(firing[daemon], admins[daemon], r)
                end = time.monotonic()
                ops = workload.stop()
                stats = window_stats(ops, start, end, workload.op_bytes)
                results[cond].append(stats)
                if cond != "alone":
                    saves[cond].append(end - start)
                say(f"  round {r + 1} {cond:>11}: foreground {stats['mbps']:7.1f} MB/s, p99 {stats['p99_ms']:7.2f} ms"
                    + (f", save {end - start:6.2f} s" if cond != "alone" else ""))
                time.sleep(0.5)  # let retention and writeback settle before the next condition
        for c in (*clients.values(), *firing.values()):
            c.close()
        for a in admins.values():
            a.close()
        throttled_status = _throttle_status(daemons["throttled"])
    finally:
        for d in daemons.values():
            d.cleanup()
        import shutil

        shutil.rmtree(root, ignore_errors=True)

    def med(cond: str, key: str) -> float:
        return round(statistics.median(s[key] for s in results[cond]), 3)

    report: dict[str, Any] = {
        "fg_alone_mbps": med("alone", "mbps"),
        "fg_unthrottled_mbps": med("unthrottled", "mbps"),
        "fg_throttled_mbps": med("throttled", "mbps"),
        "fg_waited_mbps": med("waited", "mbps"),
        "fg_raw_mbps": med("raw", "mbps"),
        "fg_p99_latency_ms": {c: med(c, "p99_ms") for c in CONDITIONS},
        **{f"save_{c}_s": round(statistics.median(saves[c]), 3) for c in SAVES},
    }
    # A save someone waits for runs at full speed under others' traffic: beside a raw write of the same bytes.
    report["waited_vs_raw"] = round(report["save_waited_s"] / report["save_raw_s"], 3) if report["save_raw_s"] else None
    alone_mbps, alone_p99 = report["fg_alone_mbps"], report["fg_p99_latency_ms"]["alone"]
    report["throttled_vs_alone"] = {
        "mbps": round(report["fg_throttled_mbps"] / alone_mbps, 3) if alone_mbps else None,
        "p99": round(report["fg_p99_latency_ms"]["throttled"] / alone_p99, 3) if alone_p99 else None,
    }
    report["unthrottled_vs_alone"] = {
        "mbps": round(report["fg_unthrottled_mbps"] / alone_mbps, 3) if alone_mbps else None,
        "p99": round(report["fg_p99_latency_ms"]["unthrottled"] / alone_p99, 3) if alone_p99 else None,
    }
    ratios = report["throttled_vs_alone"]
    report["target_met"] = bool(ratios["mbps"] is not None and ratios["mbps"] >= 0.85
                                and ratios["p99"] is not None and ratios["p99"] <= 1.5)
    report["config"] = {"size": size, "rounds": args.rounds, "fg": args.fg, "window_s": window, "warmup_s": warmup,
                        "throttled_daemon_end_status": throttled_status}
    report["rounds"] = {c: results[c] for c in CONDITIONS}
    if args.json:
        print_json(report)
    else:
        print(f"foreground alone        {report['fg_alone_mbps']:8.1f} MB/s  p99 {alone_p99:7.2f} ms")
        for cond in ("unthrottled", "throttled"):
            rel = report[f"{cond}_vs_alone"]
            print(f"foreground {cond:<12} {report[f'fg_{cond}_mbps']:8.1f} MB/s  p99 "
                  f"{report['fg_p99_latency_ms'][cond]:7.2f} ms  ({rel['mbps']:.0%} of alone, p99 x{rel['p99']:.2f}); "
                  f"save {report[f'save_{cond}_s']:.2f} s")
        print(f"target (throttled >= 85% of alone, p99 <= 1.5x alone): {'met' if report['target_met'] else 'NOT met'}")
        print(f"a save someone waits for (save()) on the throttled daemon {report['save_waited_s']:.2f} s, raw write + "
              f"fsync of the same bytes under the same traffic {report['save_raw_s']:.2f} s: "
              f"{report['waited_vs_raw']}x (target <= 1.5x)")
    return 0


def _background_save(firing: Client, admin: Admin, serial: int) -> None:
    """Start a background save (the job's dirty_bytes rule) and wait until it is committed."""
    before = admin.status("bench")["latest_version"]
    firing.update({"round": serial})
    while admin.status("bench")["latest_version"] == before:
        time.sleep(0.01)


def _throttle_status(daemon: PrivateDaemon) -> dict[str, Any]:
    with Admin(address=daemon.address, timeout=10) as admin:
        status: dict[str, Any] = admin.status()["daemon"]["throttle"]
    return status
