"""``autosaved verify [JOB]``: re-hash every retained version and read the write-ahead log; report damage.

Exit 0 when every version verifies, 1 when any is damaged (the damaged ones are named).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..integrations.globalcheck import check_global_versions
from ..storage.local import JobStore
from .common import print_json, table
from .maintenance import add_arguments, run_maintenance


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="re-hash stored versions and report damage")
    add_arguments(p)


def _offline(stores: list[JobStore]) -> list[dict[str, Any]]:
    reports = []
    for i, store in enumerate(stores, 1):
        print(f"verifying {store.job} ({i}/{len(stores)})", file=sys.stderr)
        reports.append(store.check())
    return reports


def run(args: argparse.Namespace) -> int:
    reports = run_maintenance(args, "verify", _offline, exclusive=False)
    check_global_versions(reports, timeout=args.timeout)  # multi-rank (DCP) versions: check every part too
    if args.json:
        print_json(reports)
    else:
        rows = []
        for r in reports:
            for v in r["versions"]:
                rows.append([r["job"], str(v["id"]), str(v["step"] if v["step"] is not None else "-"),
                             "ok" if v["ok"] else f"DAMAGED: {v['error']}"])
            if r["log"]["torn"]:
                rows.append([r["job"], "log", "-", f"torn tail (cut at the next daemon start): {r['log']['torn'][0]}"])
            for where in r["log"].get("damaged", []):
                rows.append([r["job"], "log", "-", f"DAMAGED (kept; the job is not served): {where}"])
        print(table(rows, ["JOB", "VERSION", "STEP", "RESULT"]) if rows else "no versions")
    damaged = [f"{r['job']} v{v['id']}" for r in reports for v in r["versions"] if not v["ok"]]
    damaged += [f"{r['job']} log" for r in reports if r["log"].get("damaged")]
    if damaged:
        print(f"autosaved verify: damaged: {', '.join(damaged)}", file=sys.stderr)
        return 1
    return 0
