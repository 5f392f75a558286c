"""``autosaved remote takeover JOB --remote URL``: the old host is gone, let a replacement publish now.

Writes the job's lease with a higher epoch and no time left, so the next daemon that asks (the
replacement) takes it at once with a higher epoch still; the old holder's next renewal fails and it never
publishes a version of the job again, even if it comes back. Reads never need the lease.

A lease that is still live means its holder renewed it within ``lease_ttl``: that host is probably not
gone. The take-over is then refused, naming the holder and until when, unless ``--force``.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
import time
from datetime import datetime
from typing import Any

from .common import print_json


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="manage a job's copy in the object store")
    ops = p.add_subparsers(dest="remote_op", metavar="OP", required=True)
    t = ops.add_parser("takeover", help="fence the job's current publisher so a replacement host publishes now")
    t.add_argument("job")
    t.add_argument("--remote", metavar="URL", required=True, help="s3://bucket/prefix")
    t.add_argument("--endpoint", metavar="URL", help="for non-AWS stores (default: $AWS_ENDPOINT_URL, else AWS)")
    t.add_argument("--owner", type=int, help="uid whose job (root only; default: yours)")
    t.add_argument("--force", action="store_true",
                   help="take over even while the holder's lease is live (it renewed lately: is it really gone?)")
    t.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..remote_offline import check_owner, run_sync
    from ..storage.remote import LeaseHeld, RemoteStore

    store = RemoteStore(args.remote, endpoint=args.endpoint)
    job = store.job(check_owner(args.owner), args.job)
    who = f"takeover by {getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
    try:
        lease = run_sync(lambda: job.acquire(who, 0.0, take_over=args.force))
    except LeaseHeld:
        current = run_sync(job.read_lease)
        if current is None:
            raise
        until = datetime.fromtimestamp(current.expires).astimezone().isoformat(timespec="seconds")
        raise LeaseHeld(
            f"{args.job}: not taken over: the lease is live, held by {current.holder} (epoch {current.epoch}) until "
            f"{until} ({max(0.0, current.expires - time.time()):.0f}s from now), and that daemon renews it while it "
            "runs. If its host is really gone, wait for the lease to expire or run again with --force (the holder "
            "is then fenced: it never publishes this job again)") from None
    result = {"job": args.job, "epoch": lease.epoch, "fences": lease.fences}
    if args.json:
        print_json(result)
    else:
        print(f"{args.job}: lease taken over at epoch {lease.epoch}; the previous holder can no longer publish, "
              "and the next daemon to ask publishes at once")
    return 0
