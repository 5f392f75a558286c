"""``autosaved save JOB``: commit a version of a job now."""

from __future__ import annotations

import argparse
from typing import Any

from ..client.sync import Client
from .common import add_client_options, print_json


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="commit a version of a job now")
    p.add_argument("job")
    add_client_options(p)
    p.add_argument("--json", action="store_true", help="print {\"job\": ..., \"version\": ...}")


def run(args: argparse.Namespace) -> int:
    with Client(args.job, address=args.address, timeout=args.timeout) as client:
        version = client.save()
    if args.json:
        print_json({"job": args.job, "version": version})
    else:
        print(f"{args.job}: version {version} committed")
    return 0
