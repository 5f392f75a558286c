"""``autosaved delete JOB``: forget a job, its live state and every stored version (with ``[remote]``, its
objects in the bucket too)."""

from __future__ import annotations

import argparse
from typing import Any

from .common import add_client_options, add_owner_option, admin, human_bytes, print_json


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
        print(describe(args.job, summary))
    return 0


def describe(job: str, summary: dict[str, Any]) -> str:
    """What was removed where: this host's versions, and (with ``[remote]``) the bucket's objects, or
    that their deletion is pending."""
    line = f"{job}: deleted here ({summary['deleted_versions']} local versions)"
    remote = summary.get("remote")
    if remote is None:
        return line
    if remote.get("state") == "deleted":
        return (f"{line}; deleted from {remote['url']} ({remote['objects']} objects, "
                f"{human_bytes(int(remote['bytes']))})")
    return (f"{line}; deleting it from {remote['url']} is PENDING: the bucket could not be reached "
            f"({remote.get('error')}). The daemon completes it once the bucket answers and meanwhile never "
            "loads the job from there")
