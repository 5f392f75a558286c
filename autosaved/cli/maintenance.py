"""What ``verify`` and ``gc`` share: ask the daemon, or work on the state dir when it is down."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from ..daemon.lock import PidLock
from ..errors import DaemonUnavailable, NotFound
from ..storage.local import JobStore, Store
from .common import add_client_options, add_owner_option, admin, state_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", help="one job (default: every job you own; root: every job)")
    add_client_options(p)
    add_owner_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.add_argument("--offline", action="store_true", help="work on the state dir, do not ask the daemon")


def offline_stores(args: argparse.Namespace) -> list[JobStore]:
    store = Store(state_dir(args))
    uid = os.geteuid()
    owner = getattr(args, "owner", None)
    owner = uid if owner is None else owner
    if args.job:
        js = store.job(owner, args.job)
        if not js.path.exists():
            raise NotFound(f"no job named {args.job!r} in {store.root}")
        return [js]
    return store.jobs(None if uid == 0 and getattr(args, "owner", None) is None else owner)


def run_maintenance(args: argparse.Namespace, op: str,
                    offline: Callable[[list[JobStore]], list[dict[str, Any]]], *, exclusive: bool) -> list[Any]:
    """Through the daemon when it answers (it serialises the work with its own saves); else directly on
    the state dir — for ``gc`` only once no daemon holds it (``exclusive``)."""
    if not args.offline:
        try:
            with admin(args) as client:
                if op == "verify":
                    return client.verify(args.job)
                return client.gc(args.job, dry_run=getattr(args, "dry_run", False))
        except DaemonUnavailable:
            print(f"autosaved {op}: daemon not reachable; working on the state dir directly", file=sys.stderr)
    directory = state_dir(args)
    if not exclusive or getattr(args, "dry_run", False):  # a dry run changes nothing: no need to hold the dir
        return offline(offline_stores(args))
    lock = PidLock(directory / "daemon.lock", f"state dir {directory}")
    lock.acquire()  # AlreadyRunning, with the holder's pid, when a daemon owns the state dir
    try:
        return offline(offline_stores(args))
    finally:
        lock.release()

