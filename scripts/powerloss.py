#!/usr/bin/env python3
"""The power-loss checker at full size: record the workload of ``autosaved.testing.workload`` against a
real daemon, build every crash state of the trace (``autosaved.testing.crashsim``), check each offline
and a sample with a fresh daemon, and print the counts and every vulnerability found.

    python scripts/powerloss.py                      # every distinct state checked (independent fates)
    python scripts/powerloss.py --rounds 6 --daemon-states 40
    python scripts/powerloss.py --model shared       # the model before issue 19, to compare

The summary names the model, how many cuts were enumerated in full and how many sampled (with the
number of random plans per cut and the seed: rerun with the same ``--seed`` to get the same states).

Exit status 1 when a vulnerability is found.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from autosaved.testing.crashsim import MODELS, explore, parse, scratch_dir
from autosaved.testing.workload import record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="extra save/log/gc rounds in the workload (default 2)")
    ap.add_argument("--samples", type=int, default=24, help="random drop-sets per cut (default 24)")
    ap.add_argument("--window", type=int, default=0,
                    help="try each single drop only for the N most recent un-synced entries (0: all)")
    ap.add_argument("--daemon-states", type=int, default=20, help="states also opened by a fresh daemon")
    ap.add_argument("--max-states", type=int, default=0, help="cap on distinct states checked (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", choices=MODELS, default="independent",
                    help="independent: every un-synced write and entry has its own fate (default); "
                         "shared: all un-synced data shares one (the checker before issue 19)")
    ap.add_argument("--show", type=int, default=30, help="vulnerabilities to print in full")
    ap.add_argument("--keep", type=Path, help="keep the run (trace, daemon logs) in this folder")
    args = ap.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="autosaved-powerloss-"))
    work = scratch_dir(root / "work")
    started = time.monotonic()
    try:
        rec = record(root / "run", rounds=args.rounds, seed=args.seed + 1)
        trace = parse(rec.trace)
        acks = sum(1 for _, m in trace.marks if m["ev"] == "ack")
        print(f"recorded {len(trace.ops)} file-system operations, {acks} acks "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        report = explore(trace, rec.history, rec.jobs, work, seed=args.seed, samples=args.samples,
                         window=args.window or None, max_states=args.max_states or None,
                         daemon_states=args.daemon_states, daemon_config=rec.config, model=args.model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report.summary())
    print(f"elapsed {time.monotonic() - started:.0f} s")
    for f in report.findings[: args.show]:
        print(" ", f)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
