"""``autosaved gc [JOB]``: apply retention (``keep_last``, ``keep_every``) and delete unreferenced chunks now.

The daemon also does this after every save; ``gc`` is for after a crash, a config change, or ``--offline``
on a host whose daemon is stopped. The newest version that verifies is never deleted, and with ``[remote]``
neither is a version not yet in the object store (``--offline`` asks the bucket; while it cannot be read,
every local version is kept).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..config import load_config
from ..storage.local import JobStore
from .common import human_bytes, print_json, state_dir, table
from .maintenance import add_arguments, run_maintenance


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="apply retention and delete unreferenced chunks")
    add_arguments(p)
    p.add_argument("--config", help="config whose [policy] keep_last/keep_every apply with --offline")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be deleted (versions, chunks, bytes) and delete nothing")


def run(args: argparse.Namespace) -> int:
    def offline(stores: list[JobStore]) -> list[dict[str, Any]]:
        config = load_config(config_file=getattr(args, "config", None), state_dir=state_dir(args))
        keep_last, keep_every, keep_best = config.policy.keep_last, config.policy.keep_every, config.policy.keep_best
        held: dict[tuple[int, str], set[int]] = {}
        if config.remote.url is not None:
            from ..remote_offline import unreplicated_versions

            held, error = unreplicated_versions(config.remote, stores)
            if error is not None:
                print(f"autosaved gc: cannot read the object store ({error}); keeping every local version",
                      file=sys.stderr)
        return [{"job": s.job, "owner": s.owner,
                 **s.gc(keep_last, keep_every, held.get((s.owner, s.job)), dry_run=args.dry_run,
                         keep_best=keep_best).to_json()}
                for s in stores]

    results = run_maintenance(args, "gc", offline, exclusive=True)
    if args.json:
        print_json(results)
    else:
        rows = [[r["job"], _ids(r["deleted_versions"]), str(r["removed_chunks"]), human_bytes(r["freed_bytes"]),
                 r["blocked"] or _kept(r.get("kept_unreplicated") or [])] for r in results]
        verb = "WOULD DELETE" if args.dry_run else "DELETED"
        print(table(rows, ["JOB", f"VERSIONS {verb}", f"CHUNKS {verb}", "WOULD FREE" if args.dry_run else "FREED",
                           "NOTE"]) if rows else "no jobs")
        if args.dry_run and rows:
            print("dry run: nothing was deleted")
    return 1 if any(r["blocked"] for r in results) else 0


def _kept(versions: list[int]) -> str:
    return f"kept {len(versions)} versions not yet in the object store" if versions else ""


def _ids(versions: list[int]) -> str:
    return f"{len(versions)} ({', '.join(map(str, versions))})" if versions else "0"
