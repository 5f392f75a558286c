#!/usr/bin/env python3
"""Fuzz a live daemon (see ``autosaved.testing.fuzzd``): mutated and random messages to its ZeroMQ
socket and its fd socket; prints the counts, every bad reply, every daemon exit with its reproducer
(the messages sent since the last liveness check), and whether stored data changed.

    python scripts/fuzz_daemon.py --messages 100000
    python scripts/fuzz_daemon.py --messages 2000 --known     # the issue's known crashers first

Exit status 1 on a daemon exit, a bad reply or changed data.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from autosaved.testing.fuzzd import FuzzReport, FuzzRun, known_crashers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--known", action="store_true", help="send the issue's known crashers first")
    ap.add_argument("--no-destructive", action="store_true",
                    help="leave gc and delete out (they race saves: issue #9 defects 2, 3)")
    ap.add_argument("--keep", type=Path, help="keep the state dir and daemon log here")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="autosaved-fuzz-"))
    started = time.monotonic()
    last = [0.0]

    def progress(rep: FuzzReport) -> None:
        if time.monotonic() - last[0] > 30:
            last[0] = time.monotonic()
            print(f"[{time.monotonic() - started:.0f} s] {rep.summary()}", flush=True)

    try:
        report = FuzzRun(root, args.seed, on_progress=progress, destructive=not args.no_destructive).run(
            args.messages, known=known_crashers() if args.known else None)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(report.summary())
    print(f"elapsed {time.monotonic() - started:.0f} s")
    for line in report.bad_replies[:10]:
        print("  bad reply:", line[:900])
    for i, rep in enumerate(report.reproducers[:10]):
        print(f"  daemon exit {i + 1}; last messages before it was found dead:")
        for m in rep[-5:]:
            print("    ", repr(m)[:600])
    for line in report.changed[:20]:
        print("  changed:", line)
    return 1 if report.daemon_exits or report.bad_replies or report.changed else 0


if __name__ == "__main__":
    sys.exit(main())
