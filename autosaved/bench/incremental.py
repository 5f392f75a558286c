"""``autosaved bench incremental [--size 1GiB] [--json]``: how much a save writes when little changed.

On a private daemon in a temp dir: commit a state of random float32 arrays, change 1% of it in one place
(an optimizer touching one layer), commit again, then change 1% scattered over the whole state (the worst
case for fixed-size chunks) and commit again. Bytes come from the daemon's own ``bytes_written`` counter.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from ..client.sync import Client
from ..config import parse_size
from ..errors import NotFound
from ..fmt import human_bytes
from ..testing.private import PrivateDaemon

POLICY = '[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n[throttle]\nenabled = false\n'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="1GiB", help="state size (default 1GiB)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def measure(size: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    layers = 16
    per = max(1, size // layers // 4)
    state = {f"layer{i}": rng.random(per, dtype=np.float32) for i in range(layers)}
    total = sum(a.nbytes for a in state.values())
    with PrivateDaemon(config=POLICY) as daemon, Client("bench", address=daemon.address) as c:

        def written() -> int:
            try:
                return int(c.status()["bytes_written"])
            except NotFound:  # before the first update there is no job yet
                return 0

        def commit(delta: dict[str, Any]) -> tuple[int, float]:
            before = written()
            t = time.perf_counter()
            c.update(delta, wait="committed")
            return written() - before, time.perf_counter() - t

        full, full_s = commit(state)
        one = state["layer5"].copy()
        n = total // 100 // 4
        one[17 : 17 + n] += 1.0  # 1% of the state, in one place
        local, local_s = commit({"layer5": one})
        scattered = {k: v.copy() for k, v in state.items()}
        for arr in scattered.values():
            arr[:: 100] += 1.0  # 1% of the elements, everywhere
        spread, spread_s = commit(scattered)
    return {
        "bytes": total,
        "full_written_bytes": full,
        "full_save_s": round(full_s, 3),
        "local_1pct_written_bytes": local,
        "local_1pct_written_fraction": round(local / total, 4),
        "local_1pct_save_s": round(local_s, 3),
        "scattered_1pct_written_bytes": spread,
        "scattered_1pct_written_fraction": round(spread / total, 4),
        "scattered_1pct_save_s": round(spread_s, 3),
    }


def run(args: argparse.Namespace) -> int:
    size = parse_size(args.size, "--size")
    assert size is not None
    result = measure(size)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"state {human_bytes(result['bytes'])} of float32 in 16 leaves")
    print(f"  full save:            wrote {human_bytes(result['full_written_bytes'])} in {result['full_save_s']}s")
    print(f"  1% changed in place:  wrote {human_bytes(result['local_1pct_written_bytes'])} "
          f"({100 * result['local_1pct_written_fraction']:.2f}% of the state) in {result['local_1pct_save_s']}s")
    print(f"  1% changed scattered: wrote {human_bytes(result['scattered_1pct_written_bytes'])} "
          f"({100 * result['scattered_1pct_written_fraction']:.2f}%) in {result['scattered_1pct_save_s']}s "
          "(every chunk changed: content addressing cannot help)")
    return 0
