"""What an idle job costs the daemon (issue 20: <= 64 KiB beyond its root once evicted).

    python scripts/idle_jobs.py --jobs 400 --memory-limit 1MiB   # nearly all evicted: ~12 KiB of RSS per job
    python scripts/idle_jobs.py --jobs 400 --memory-limit 4GiB   # all resident

Starts a private daemon under ``memory_limit``, writes and saves ``--jobs`` jobs of about 30 KB encoded
each (300 small maps: an agent's progress), and prints the daemon's RSS growth per job and its cache
status. Run both limits side by side and compare the per-job figures (machine load shifts both alike).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import autosaved
from autosaved.client.admin import Admin
from autosaved.testing.private import PrivateDaemon

POLICY = '[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'


def state(i: int, n: int = 300) -> dict[str, Any]:
    steps = {f"s{j}": {"stage": "reasoning", "out": f"job {i} step {j} " + "lorem " * 8, "n": j} for j in range(n)}
    return {"steps": steps, "step": i}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=400)
    p.add_argument("--memory-limit", default="1MiB")
    args = p.parse_args()
    config = f'write_speed = "200MiB"\nmemory_limit = "{args.memory_limit}"\n' + POLICY
    with PrivateDaemon(Path(tempfile.mkdtemp(prefix="autosaved-idle-")), config=config) as d:
        d.start()
        with autosaved.Client("warm-up", address=d.address) as c:
            c.update(state(-1), wait="committed")
        with Admin(address=d.address) as a:
            base = a.status()["daemon"]["rss_bytes"]
        started = time.time()
        for i in range(args.jobs):
            with autosaved.Client(f"j{i}", address=d.address) as c:
                c.update(state(i), wait="committed")
        with Admin(address=d.address) as a:
            s = a.status()
        daemon = s["daemon"]
        encoded = sum(j["state_bytes"] for j in s["jobs"]) / len(s["jobs"])
        print(f"memory_limit={args.memory_limit} jobs={args.jobs} encoded_per_job={encoded:.0f} "
              f"rss_before={base} rss_after={daemon['rss_bytes']} "
              f"rss_per_job={(daemon['rss_bytes'] - base) / args.jobs:.0f} cache={daemon['cache']} "
              f"took={time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
