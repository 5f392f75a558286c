"""``autosaved`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from .. import __version__
from ..errors import AutosavedError
from . import bench, demo, list_cmd, save, serve, status

COMMANDS: dict[str, ModuleType] = {
    "serve": serve,
    "status": status,
    "list": list_cmd,
    "save": save,
    "demo": demo,
    "bench": bench,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosaved", description="Checkpointing daemon for training jobs, and its command line."
    )
    parser.add_argument("--version", action="version", version=f"autosaved {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = COMMANDS[args.command].run(args)
        return code
    except AutosavedError as exc:
        print(f"autosaved {args.command}: {exc}", file=sys.stderr)
        return 2 if exc.code in ("bad_config", "bad_job", "already_running") else 1
    except KeyboardInterrupt:
        return 130
