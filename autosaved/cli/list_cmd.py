"""``autosaved list [JOB]``: jobs, or one job's versions. Asks the daemon; reads the state dir when the
daemon is down (or when ``--offline`` is given)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from ..errors import DaemonUnavailable, NotFound
from ..integrations.globalver import global_rows, parts_summary
from ..storage.local import Store
from .common import add_client_options, admin, human_bytes, print_json, state_dir, table


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="list jobs, or the versions of one job")
    p.add_argument("job", nargs="?")
    add_client_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.add_argument("--offline", action="store_true", help="read the state dir, do not ask the daemon")
    p.add_argument("--remote", metavar="URL", help="list the object store (s3://bucket/prefix), not this host")
    p.add_argument("--endpoint", metavar="URL",
                   help="the store's endpoint for non-AWS stores (default: $AWS_ENDPOINT_URL, else AWS)")


def _offline(args: argparse.Namespace) -> list[dict[str, Any]]:
    store = Store(state_dir(args))
    uid = os.geteuid()
    if args.job:
        infos = store.job(uid, args.job).list_versions()
        if not infos:
            raise NotFound(f"no versions of job {args.job!r} in {store.root}")
        return [i.to_json() for i in infos]
    out = []
    for js in store.jobs(None if uid == 0 else uid):
        ids = js.version_ids()
        out.append({"job": js.job, "owner": js.owner, "versions": len(ids), "latest": ids[-1] if ids else None,
                    "bytes": js.stored_bytes(), "dirty": js.unsaved_log_records() > 0})
    return out


def run(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]]
    if args.remote:
        from ..remote_offline import list_remote

        rows = list_remote(args.remote, endpoint=args.endpoint, job=args.job)
        if args.job and not rows:
            raise NotFound(f"no versions of job {args.job!r} in {args.remote}")
    elif args.offline:
        rows = _offline(args)
    else:
        try:
            with admin(args) as client:
                rows = client.versions(args.job) if args.job else client.jobs()
        except DaemonUnavailable:
            print("autosaved list: daemon not reachable; reading the state dir directly", file=sys.stderr)
            rows = _offline(args)
    global_versions = global_rows(rows) if args.job else None  # a multi-rank (DCP) job: its global versions
    if global_versions is not None:
        rows = global_versions
    if args.json:
        print_json(rows)
        return 0
    if global_versions is not None:
        print(table([[str(r["id"]), r["time"], str(r["world_size"]), "ok" if r["ok"] else f"CORRUPT: {r['error']}",
                      parts_summary(r["parts"])] for r in rows],
                    ["GLOBAL VERSION", "TIME", "WORLD", "VERIFIED", "PARTS (rank:version@daemon)"]))
    elif args.job:
        print(table([[str(r["id"]), str(r["step"] if r["step"] is not None else "-"), r["time"],
                      human_bytes(r["bytes"]), r["reason"], _verified(r), _best(r)]
                     for r in rows],
                    ["VERSION", "STEP", "TIME", "SIZE", "REASON", "VERIFIED", "BEST"]))
    elif rows and args.remote:
        print(table([[r["job"], str(r["owner"]), str(r["versions"]), str(r["latest"] or "-"), r["latest_time"] or "-",
                      human_bytes(r["bytes"])] for r in rows],
                    ["JOB", "OWNER", "VERSIONS", "LATEST", "LATEST TIME", "IN BUCKET"]))
    elif rows:
        print(table([[r["job"], str(r["owner"]), str(r["versions"]), str(r["latest"] or "-"), human_bytes(r["bytes"]),
                      "yes" if r.get("dirty") else "no"] for r in rows],
                    ["JOB", "OWNER", "VERSIONS", "LATEST", "STORED", "UNSAVED"]))
    else:
        print("no jobs")
    return 0


def _verified(row: dict[str, Any]) -> str:
    if row.get("only_in_bucket"):
        return "in the bucket only"
    return "ok" if row["ok"] else f"CORRUPT: {row['error']}"


def _best(row: dict[str, Any]) -> str:
    """``*`` and the value for a version ``keep_best`` keeps (``* val_loss=0.31``)."""
    metric = row.get("best")
    return f"* {metric}={(row.get('meta') or {}).get(metric)}" if metric else ""
