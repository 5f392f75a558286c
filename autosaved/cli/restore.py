"""``autosaved restore JOB --out DIR``: write a job's state as safetensors + JSON (see :mod:`.exchange`).

By default the newest state the daemon holds (including updates it accepted but has not saved yet);
``--version`` or ``--step`` picks a stored version instead. Reads the state dir directly with
``--offline`` or when the daemon is down (that needs read access to the state dir).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import DaemonUnavailable, NotFound
from .common import (
    Progress,
    add_client_options,
    add_owner_option,
    add_progress_option,
    admin,
    find_step,
    offline_store,
    print_json,
)
from .exchange import write_export


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="a stored version id")
    which.add_argument("--step", type=int, help="the newest stored version at this step")
    p.add_argument("--out", type=Path, required=True, help="folder to write (created if missing)")
    add_client_options(p)
    add_owner_option(p)
    p.add_argument("--offline", action="store_true", help="read the state dir, do not ask the daemon")
    add_remote_options(p)
    add_progress_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def add_parser(sub: Any, name: str) -> None:
    add_arguments(sub.add_parser(name, help="write a job's state as safetensors + JSON"))


def _from_daemon(args: argparse.Namespace, live: bool) -> tuple[Any, dict[str, Any]]:
    with admin(args) as client:
        version = args.version
        if args.step is not None:
            version = find_step(client.versions(args.job), args.step, args.job)
        elif version is None and not live:
            version = client.status(args.job)["latest_version"]
            if version is None:
                raise NotFound(f"job {args.job!r} has no committed version yet")
        exported = client.export(args.job, version)
    if exported is None:
        raise NotFound(f"job {args.job!r} has no state")
    info = {"job": args.job, "owner": os.geteuid() if args.owner is None else args.owner,
            "version": exported.version, "step": exported.step, "live": exported.live}
    return exported.tree, info


def _from_state_dir(args: argparse.Namespace, live: bool) -> tuple[Any, dict[str, Any]]:
    store = offline_store(args, args.job)
    version = args.version
    if args.step is not None:
        version = find_step([i.to_json() for i in store.list_versions(verify=False)], args.step, args.job)
    if version is None and live:
        # What the daemon would serve after a restart: the newest version plus the logged updates after it.
        recovered = store.recover()
        if recovered is None:
            raise NotFound(f"job {args.job!r} has no state in {store.path}")
        base = recovered.version
        info = {"job": args.job, "owner": store.owner, "version": base.info.id if base else None,
                "step": recovered.step, "time": base.info.time if base else None, "meta": recovered.meta,
                "live": bool(recovered.replay.records)}
        return recovered.tree, info
    loaded = store.load(version) if version is not None else store.load_newest()
    if loaded is None:
        raise NotFound(f"job {args.job!r} has no version in {store.path}")
    i = loaded.info
    info = {"job": args.job, "owner": store.owner, "version": i.id, "step": i.step, "time": i.time,
            "meta": i.meta, "live": False}
    return loaded.tree, info


def add_remote_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remote", metavar="URL", help="read from the object store (s3://bucket/prefix), not this host")
    p.add_argument("--endpoint", metavar="URL",
                   help="the store's endpoint for non-AWS stores (default: $AWS_ENDPOINT_URL, else AWS)")


def _from_remote(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from ..remote_offline import list_remote, load_remote

    version = args.version
    if args.step is not None:
        rows = list_remote(args.remote, endpoint=args.endpoint, job=args.job, owner=args.owner)
        version = find_step(rows, args.step, args.job)

    def skipped(exc: Exception) -> None:
        print(f"autosaved: skipping corrupt version of {args.job!r}: {exc}", file=sys.stderr)

    loaded = load_remote(args.job, args.remote, endpoint=args.endpoint, version=version, owner=args.owner,
                         on_skip=skipped)
    if loaded is None:
        raise NotFound(f"job {args.job!r} has no version in {args.remote}")
    i = loaded.info
    info = {"job": args.job, "owner": os.geteuid() if args.owner is None else args.owner, "version": i.id,
            "step": i.step, "time": i.time, "meta": i.meta, "live": False}
    return loaded.tree, info


def export(args: argparse.Namespace, *, live: bool, verb: str) -> int:
    if getattr(args, "remote", None):
        tree, info = _from_remote(args)
    elif args.offline:
        tree, info = _from_state_dir(args, live)
    else:
        try:
            tree, info = _from_daemon(args, live)
        except DaemonUnavailable:
            print(f"autosaved {verb}: daemon not reachable; reading the state dir directly", file=sys.stderr)
            tree, info = _from_state_dir(args, live)
    progress = Progress(f"writing {args.out}", force=args.progress)
    summary = write_export(tree, info, args.out, progress)
    progress.finish()
    if args.json:
        print_json(summary)
    else:
        what = "live state" if summary.get("live") else f"version {summary['version']}"
        print(f"{args.job}: {what} (step {summary.get('step')}) written to {args.out}: {summary['tensors']} "
              f"tensors in {summary['files'][0]}, the rest in {summary['files'][1]}")
    return 0


def run(args: argparse.Namespace) -> int:
    return export(args, live=True, verb="restore")
