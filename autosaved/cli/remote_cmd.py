"""``autosaved remote takeover JOB --remote URL``: the old host is gone, let a replacement publish now.

Writes the job's lease with a higher epoch and no time left, so the next daemon that asks (the
replacement) takes it at once with a higher epoch still; the old holder's next renewal fails and it never
publishes a version of the job again, even if it comes back. Reads never need the lease.
"""

from __future__ import annotations

import argparse
import getpass
import os
import socket
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
    t.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..remote_offline import check_owner, run_sync
    from ..storage.remote import RemoteStore

    store = RemoteStore(args.remote, endpoint=args.endpoint)
    job = store.job(check_owner(args.owner), args.job)
    who = f"takeover by {getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
    lease = run_sync(lambda: job.acquire(who, 0.0, take_over=True))
    result = {"job": args.job, "epoch": lease.epoch, "fences": lease.fences}
    if args.json:
        print_json(result)
    else:
        print(f"{args.job}: lease taken over at epoch {lease.epoch}; the previous holder can no longer publish, "
              "and the next daemon to ask publishes at once")
    return 0
