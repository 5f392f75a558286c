"""``autosaved bench shapes [--maps 600000] [--json]``: does one job's shape set another job's cost?

Issue 19 (defect 2): after one client stored 600,000 tiny maps (3 updates of 200,000 ``{"a": j}``), another
job's 1 MiB update went from 0.36 ms to 4.3 s, because every update of a client with a lent slot walked
every leaf of every job (and the quota check, ``status`` and ``/metrics`` walked too). One run, on a private
daemon in a temp dir (no policy saves, a ``quota.max_bytes`` so the quota check runs):

1. ``alone``: a probe client sends ``--updates`` updates of a 1 MiB array (through a shared-memory slot, so
   it always has a slot lent) and as many one-key updates, with no other job on the daemon;
2. ``beside``: another client, in a process of its own, stores ``--maps`` tiny maps in 3 updates and exits;
   the probe measures again, the same way.

Keys: ``alone_1mib_p50_s``/``beside_1mib_p50_s`` and ``alone_key_p50_s``/``beside_key_p50_s`` (the probe's
median latency), their ratios ``mib_beside_over_alone``/``key_beside_over_alone`` (the target: about 1), and
``fill_s`` (the other client's start and 3 updates, for scale). The run as root is exempt from the quota; the
held-slot walk it measures applies to every user.
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

import numpy as np

from ..client.sync import Client
from ..fmt import print_json, table
from ..testing.private import PrivateDaemon
from .small import pct

KEYS = ("alone_1mib_p50_s", "beside_1mib_p50_s", "mib_beside_over_alone", "alone_key_p50_s", "beside_key_p50_s",
        "key_beside_over_alone", "fill_s")
_DAEMON_CONFIG = ('[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'
                  '[throttle]\nenabled = false\n[quota]\nmax_bytes = "1TiB"\n')


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--maps", type=int, default=600_000, help="tiny maps the other job holds (default 600000)")
    p.add_argument("--updates", type=int, default=20, help="probe updates of each kind per phase (default 20)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _probe(client: Client, updates: int, array: Any) -> tuple[list[float], list[float]]:
    mib, key = [], []
    for i in range(updates):
        t = time.perf_counter()
        client.update({"w": array, "i": i})
        mib.append(time.perf_counter() - t)
        t = time.perf_counter()
        client.update({"i": -i})
        key.append(time.perf_counter() - t)
    return mib, key


def _fill(address: str, maps: int) -> None:
    """The other client: ``maps`` tiny maps in 3 updates."""
    with Client("shapes", address=address, timeout=600) as other:
        per = max(1, maps // 3)
        for u in range(3):
            other.update({f"k{u}-{j}": {"a": j} for j in range(per)})


def measure(maps: int, updates: int, work_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"host": f"{socket.gethostname()} ({os.cpu_count()} cpus)", "maps": maps,
                           "updates": updates, "load": os.getloadavg()[0]}
    array = np.arange(1 << 20, dtype=np.uint8)
    with PrivateDaemon(work_dir / "daemon", config=_DAEMON_CONFIG) as daemon, \
            Client("probe", address=daemon.address, timeout=600) as probe:
        _probe(probe, 2, array)  # warm up: connection, job load, the slot
        alone_mib, alone_key = _probe(probe, updates, array)
        # Another process, as in the report: this one (the probe's) then holds nothing of those maps, so its
        # own garbage collector cannot show up in the probe's latency.
        t = time.perf_counter()
        filler = multiprocessing.get_context("spawn").Process(target=_fill, args=(daemon.address, maps))
        filler.start()
        filler.join()
        if filler.exitcode != 0:
            raise RuntimeError(f"the client storing the tiny maps failed (exit code {filler.exitcode})")
        out["fill_s"] = time.perf_counter() - t
        beside_mib, beside_key = _probe(probe, updates, array)
    out["alone_1mib_p50_s"], out["beside_1mib_p50_s"] = pct(alone_mib, 0.5), pct(beside_mib, 0.5)
    out["alone_key_p50_s"], out["beside_key_p50_s"] = pct(alone_key, 0.5), pct(beside_key, 0.5)
    out["mib_beside_over_alone"] = out["beside_1mib_p50_s"] / out["alone_1mib_p50_s"]
    out["key_beside_over_alone"] = out["beside_key_p50_s"] / out["alone_key_p50_s"]
    return out


def render(r: dict[str, Any]) -> str:
    rows = []
    for k in KEYS:
        v = r[k]
        rows.append([k, f"{v:.2f}" if "_over_" in k else f"{v * 1000:.3f} ms"])
    return "\n".join([f"autosaved bench shapes: a probe job's updates alone, then beside a job of {r['maps']} tiny "
                      f"maps, on {r['host']} (load {r['load']:.1f})", table(rows, ["measure", "value"])])


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-") as tmp:
        result = measure(max(3, args.maps), max(1, args.updates), Path(tmp))
    if args.json:
        print_json({k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()})
    else:
        print(render(result))
    return 0
