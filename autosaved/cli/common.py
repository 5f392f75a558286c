"""Options every client command shares, and output helpers."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..client.admin import Admin
from ..config import discover_state_dir
from ..fmt import Progress as Progress
from ..fmt import human_bytes as human_bytes
from ..fmt import print_json as print_json
from ..fmt import table as table
from ..protocol import version_at_step
from ..storage.local import JobStore


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="daemon address (default: $AUTOSAVED_ADDRESS, then the user's socket)")
    parser.add_argument("--state-dir", type=Path, help="state dir, for commands that read it directly "
                        "(default: $AUTOSAVED_STATE_DIR, then the user's default)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")


def state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else discover_state_dir()


def add_owner_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--owner", type=int, metavar="UID",
                        help="act on a job of another user (root only; default: your own jobs)")


@contextmanager
def admin(args: argparse.Namespace) -> Iterator[Admin]:
    """The SDK's admin API with the command's address, timeout and ``--owner``, once the daemon answered
    a ping: a dead daemon fails within ``--timeout``, not after the long wait of a verify or an export."""
    with Admin(address=args.address, timeout=args.timeout, owner=getattr(args, "owner", None)) as client:
        client.ping()
        yield client


def find_step(versions: list[dict[str, Any]], step: int, job: str) -> int:
    """The newest version id whose step is ``step``."""
    return version_at_step(versions, step, job)


def offline_store(args: argparse.Namespace, job: str) -> JobStore:
    owner = args.owner if getattr(args, "owner", None) is not None else os.geteuid()
    return JobStore(state_dir(args), owner, job)


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action="store_true", help="show progress on stderr even when it is not a tty")
