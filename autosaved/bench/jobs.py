"""``autosaved bench jobs [--json]``: does a host full of jobs slow any one of them down?

The target (issue 14): 1,000 jobs, each updated once a second, do not slow any of them down. One run, on a
private daemon in a temp dir (default policy, so the scheduler plans every job as it would in service):

1. ``single``: a probe client updates its own job every ``--interval`` (a ~200-byte delta,
   ``wait="accepted"``) for ``--seconds``, with no other job on the daemon;
2. ``jobs``: ``--jobs`` other jobs come up, each with its own client (its own connection, spread over
   ``--procs`` processes), and each is updated once a second, evenly spread over the second; once all
   run, the probe measures again, the same way.

Keys: ``single_p50_s``/``single_p99_s``, ``jobs_p50_s``/``jobs_p99_s`` (the probe's latency), their ratios
``jobs_p50_over_single``/``jobs_p99_over_single`` (the target: about 1), ``background_per_s`` (the updates
per second the other jobs actually got during the window; ``--jobs`` when the load kept up) and
``background_p50_s``/``background_p99_s`` (those updates' own latency). The whole run is bounded:
about ``2 * seconds`` plus the jobs' start-up (~15-30 s on 2 cores for 1,000).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from ..client.sync import Client
from ..fmt import print_json, table
from ..testing.private import PrivateDaemon
from .small import pct, small_delta

KEYS = ("single_p50_s", "single_p99_s", "jobs_p50_s", "jobs_p99_s", "jobs_p50_over_single",
        "jobs_p99_over_single", "background_per_s", "background_p50_s", "background_p99_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=1000, help="other jobs, each updated once a second (default 1000)")
    p.add_argument("--procs", type=int, default=4, help="processes their clients are spread over (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each measuring window (default 10)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between the probe's updates (0.02)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def probe(client: Client, seconds: float, interval: float) -> list[float]:
    """The probe's latencies: one update every ``interval`` for ``seconds`` (paced, not back to back)."""
    out = []
    start = time.monotonic()
    i = 0
    while (due := start + i * interval) < start + seconds:
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        delta = small_delta(i)
        t = time.perf_counter()
        client.update(delta)
        out.append(time.perf_counter() - t)
        i += 1
    return out


def _load(address: str, names: list[str], ready: Any, stop: Any, results: Any) -> None:
    """One load process: a client per job; each job updated once a second, the jobs spread evenly over the
    second, until ``stop`` is set. Reports (updates per second it achieved, their latencies)."""
    clients = [Client(name, address=address, timeout=60) for name in names]
    for c in clients:
        c.connect()
        c.update(small_delta(0))
    ready.put(len(clients))
    slot = 1.0 / max(1, len(clients))
    times: list[float] = []
    start = time.monotonic()
    n = 0
    while not stop.is_set():
        wait = start + n * slot - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        c = clients[n % len(clients)]
        t = time.perf_counter()
        c.update(small_delta(n))
        times.append(time.perf_counter() - t)
        n += 1
    results.put((n / (time.monotonic() - start), times))
    for c in clients:
        c.close()


def measure(jobs: int, procs: int, seconds: float, interval: float, work_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"host": f"{socket.gethostname()} ({os.cpu_count()} cpus)", "jobs": jobs, "procs": procs,
                           "seconds": seconds, "interval_s": interval}
    with PrivateDaemon(work_dir / "daemon") as daemon, Client("probe", address=daemon.address) as client:
        probe(client, 1.0, interval)  # warm up: connection, job load
        single = probe(client, seconds, interval)
        ctx = multiprocessing.get_context("spawn")
        ready, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        names = [f"bg-{i:05d}" for i in range(jobs)]
        shares = [names[i::procs] for i in range(procs)]
        workers = [ctx.Process(target=_load, args=(daemon.address, share, ready, stop, results))
                   for share in shares if share]
        began = time.monotonic()
        for w in workers:
            w.start()
        try:
            for _ in workers:
                ready.get(timeout=300)
            out["startup_s"] = time.monotonic() - began
            time.sleep(2.0)  # every job has gone round at least once at its steady rate
            window_start = time.monotonic()
            loaded = probe(client, seconds, interval)
            window = time.monotonic() - window_start
        finally:
            stop.set()
        rate, background = 0.0, []
        for _ in workers:
            per_s, times = results.get(timeout=120)
            rate += per_s
            background += times
        for w in workers:
            w.join(30)
        out["single_p50_s"], out["single_p99_s"] = pct(single, 0.5), pct(single, 0.99)
        out["jobs_p50_s"], out["jobs_p99_s"] = pct(loaded, 0.5), pct(loaded, 0.99)
        out["background_per_s"] = rate
        out["background_p50_s"], out["background_p99_s"] = pct(background, 0.5), pct(background, 0.99)
        out["window_s"] = window
    out["jobs_p50_over_single"] = out["jobs_p50_s"] / out["single_p50_s"]
    out["jobs_p99_over_single"] = out["jobs_p99_s"] / out["single_p99_s"]
    return out


def render(r: dict[str, Any]) -> str:
    rows = []
    for k in KEYS:
        v = r[k]
        shown = f"{v:.2f}" if "_over_" in k else (f"{v:.0f}" if k.endswith("_per_s") else f"{v * 1000:.3f} ms")
        rows.append([k, shown])
    return "\n".join([f"autosaved bench jobs: a probe job alone, then beside {r['jobs']} jobs updated once a second, "
                      f"on {r['host']} (start-up of the jobs: {r['startup_s']:.1f} s)",
                      table(rows, ["measure", "value"])])


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-") as tmp:
        result = measure(max(1, args.jobs), max(1, args.procs), max(0.5, args.seconds), max(0.001, args.interval),
                         Path(tmp))
    if args.json:
        print_json({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})
    else:
        print(render(result))
    return 0
