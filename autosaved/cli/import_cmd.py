"""``autosaved import DIR --job NAME``: commit an export folder as a new version of a job.

The job's state becomes exactly the exported one (keys the job has and the export lacks are removed),
tuples, int keys and dtypes included; the version is committed before the command returns.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..codec import unpack
from ..names import validate_job_name
from .common import add_client_options, add_owner_option, admin, print_json
from .exchange import ExportError, read_export


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="commit an exported folder as a new version")
    p.add_argument("folder", type=Path)
    p.add_argument("--job", help="job to import into (required unless --same-job)")
    p.add_argument("--same-job", action="store_true",
                   help="import into the job named inside the folder (its keys the export lacks are removed)")
    add_client_options(p)
    add_owner_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    tree, info = read_export(args.folder)
    if args.job is None and not args.same_job:
        # The folder names a job, but a folder is not to be trusted with which of your jobs to overwrite:
        # importing replaces the job's whole state (keys the export lacks are removed).
        raise ExportError(
            f"import replaces a job's whole state: name it with --job NAME (the folder says "
            f"{info.get('job')!r}; pass --same-job to import into that one)"
        )
    job = validate_job_name(args.job or info.get("job"))
    state = unpack(tree, tensors="numpy")
    step = info.get("step") if isinstance(info.get("step"), int) else None
    meta = {"imported_from": str(args.folder.absolute()), "imported_version": info.get("version")}
    with admin(args) as client:
        done = client.replace(job, state, step=step, meta=meta)
    summary = {"job": job, "version": done.ack.version, "step": step, "from": str(args.folder),
               "removed_keys": sorted(map(str, done.removed))}
    if args.json:
        print_json(summary)
    else:
        print(f"{job}: imported {args.folder} as version {done.ack.version}")
    return 0
