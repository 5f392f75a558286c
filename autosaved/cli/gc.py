"""``autosaved gc [JOB]``: apply retention (``keep_last``, ``keep_every``) and delete unreferenced chunks now.

The daemon also does this after every save; ``gc`` is for after a crash, a config change, or ``--offline``
on a host whose daemon is stopped. The newest version that verifies is never deleted.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..storage.local import JobStore
from .common import human_bytes, print_json, table
from .maintenance import add_arguments, policy_for_offline, run_maintenance


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="apply retention and delete unreferenced chunks")
    add_arguments(p)
    p.add_argument("--config", help="config whose [policy] keep_last/keep_every apply with --offline")


def run(args: argparse.Namespace) -> int:
    def offline(stores: list[JobStore]) -> list[dict[str, Any]]:
        keep_last, keep_every = policy_for_offline(args)
        return [{"job": s.job, "owner": s.owner, **s.gc(keep_last, keep_every).to_json()} for s in stores]

    results = run_maintenance(args, "gc", offline, exclusive=True)
    if args.json:
        print_json(results)
    else:
        rows = [[r["job"], str(len(r["deleted_versions"])), str(r["removed_chunks"]), human_bytes(r["freed_bytes"]),
                 r["blocked"] or ""] for r in results]
        print(table(rows, ["JOB", "VERSIONS DELETED", "CHUNKS DELETED", "FREED", "NOTE"]) if rows else "no jobs")
    return 1 if any(r["blocked"] for r in results) else 0
