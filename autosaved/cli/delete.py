"""``autosaved delete JOB``: forget a job, its live state and every stored version (with ``[remote]``, its
objects in the bucket too).

On a terminal it first says what would go and asks (``--yes`` skips the question; scripts, whose stdin is
not a terminal, are never asked). ``--dry-run`` only says what would go (on this host).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import add_client_options, add_owner_option, admin, human_bytes, print_json


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="delete a job and all its versions")
    p.add_argument("job")
    add_client_options(p)
    add_owner_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation on a terminal")


def _what(summary: dict[str, Any]) -> str:
    unsaved = summary.get("unsaved_bytes") or 0
    return (f"{summary['deleted_versions']} versions, {human_bytes(summary['freed_bytes'])} on disk"
            + (f", {human_bytes(unsaved)} of unsaved updates" if unsaved else ""))


def run(args: argparse.Namespace) -> int:
    with admin(args) as client:
        ask = not args.yes and not args.json and sys.stdin.isatty()
        if args.dry_run or ask:
            plan = client.delete(args.job, dry_run=True)
            if args.dry_run:
                if args.json:
                    print_json(plan)
                else:
                    print(f"{args.job}: would delete {_what(plan)} (dry run: nothing was deleted)")
                return 0
            try:
                answer = input(f"Delete job {args.job!r} ({_what(plan)})? This cannot be undone. [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                print(f"{args.job}: not deleted", file=sys.stderr)
                return 1
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
