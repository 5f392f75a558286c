#!/usr/bin/env python3
"""Issue 19, defect 11's crash loop at full size: a client streams ``logged`` updates of a 256 KiB array
(policy ``interval = 2s``, ``idle = 0.5s``, ``dirty_bytes = "auto"``) and the daemon is SIGKILLed a random
0.8-2.5 s after each restart's first ack. Prints, per restart: the log a start replays, how long the
``hello`` took (a 3 s client timeout), and the versions committed so far.

    python scripts/crashloop.py                 # 7 kills
    python scripts/crashloop.py --kills 20 --seed 3

Exit status 1 when a hello fails, no version is ever committed, or a start replays more than
``policy.log_bytes`` plus what one second of the stream writes.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time

import numpy as np

import autosaved
from autosaved.settings import PolicySettings
from autosaved.storage.local import JobStore
from autosaved.testing.private import PrivateDaemon

CONFIG = ('write_speed = "200MiB"\n[policy]\ninterval = "2s"\nidle = "0.5s"\ndirty_bytes = "auto"\n')
ARRAY = 256 * 1024


def log_bytes(d: PrivateDaemon) -> int:
    log = d.state_dir / "jobs" / str(os.geteuid()) / "loop" / "log"
    return sum(p.stat().st_size for p in log.glob("*.wal")) if log.is_dir() else 0


def stream(c: autosaved.Client, seed: int, first: threading.Event, stop: threading.Event) -> None:
    """Logged updates of a 256 KiB array as fast as they are acked, until ``stop`` or the daemon dies."""
    arr = np.random.default_rng(seed).integers(0, 255, ARRAY, dtype=np.uint8)
    n = 0
    try:
        while not stop.is_set():
            n += 1
            arr[:8] = n % 256
            c.update({"w": arr, "n": n}, wait="logged")
            first.set()
    except Exception:
        pass  # the daemon was killed under it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    d = PrivateDaemon(config=CONFIG, log_level="info")
    bound = PolicySettings().log_bytes or 0
    worst = 0
    failures = 0
    try:
        d.start(timeout=60)
        for k in range(args.kills + 1):
            replayed = log_bytes(d)
            worst = max(worst, replayed)
            c = autosaved.Client("loop", address=d.address, timeout=3.0)
            started = time.monotonic()
            try:
                c.connect()
            except Exception as exc:
                failures += 1
                print(f"start {k}: hello FAILED after {time.monotonic() - started:.2f} s: {exc}")
                c.close()
                d.kill()
                d.start(timeout=60)
                continue
            hello_s = time.monotonic() - started
            first = threading.Event()
            stop = threading.Event()
            t = threading.Thread(target=stream, args=(c, k, first, stop), daemon=True)
            t.start()
            first.wait(60)
            versions = len(JobStore(d.state_dir, os.geteuid(), "loop").version_ids())
            print(f"start {k}: replayed log {replayed / 2**20:.1f} MiB, hello {hello_s:.2f} s, "
                  f"versions on disk {versions}", flush=True)
            if k == args.kills:
                stop.set()
                break
            time.sleep(rng.uniform(0.8, 2.5))
            d.kill()
            stop.set()
            t.join(10)
            c.close()
            d.start(timeout=60)
        versions = len(JobStore(d.state_dir, os.geteuid(), "loop").version_ids())
        recovery = d.log().count("reason=recovery")
        by_log = d.log().count("reason=log_bytes")
        print(f"kills {args.kills}: hello failures {failures}, largest replayed log {worst / 2**20:.1f} MiB "
              f"(policy.log_bytes {bound / 2**20:.0f} MiB), versions kept {versions}, recovery saves {recovery}, "
              f"log_bytes saves {by_log}")
    finally:
        d.cleanup()
    ok = failures == 0 and versions > 0 and worst <= bound + 64 * 2**20
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
