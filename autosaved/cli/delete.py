"""``autosaved delete JOB``: forget a job, its live state and every stored version."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_client_options, add_owner_option, admin, print_json


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="delete a job and all its versions")
    p.add_argument("job")
    add_client_options(p)
    add_owner_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    with admin(args) as client:
        summary = client.delete(args.job)
    if args.json:
        print_json(summary)
    else:
        print(f"{args.job}: deleted ({summary['deleted_versions']} versions)")
    return 0
