"""``autosaved`` command line: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from .. import __version__
from ..bench import cli as bench
from ..errors import AutosavedError
from . import (
    completion,
    delete,
    demo,
    export,
    gc,
    import_cmd,
    list_cmd,
    remote_cmd,
    restore,
    save,
    serve,
    status,
    top,
    verify,
)

COMMANDS: dict[str, ModuleType] = {
    "serve": serve,
    "status": status,
    "list": list_cmd,
    "save": save,
    "restore": restore,
    "export": export,
    "import": import_cmd,
    "delete": delete,
    "demo": demo,
    "bench": bench,
    "verify": verify,
    "gc": gc,
    "remote": remote_cmd,
    "completion": completion,
    "top": top,
}


# Shell-friendly exit codes: scripts can tell "try again later" from "fix the input" from "not there".
EXIT_CODES: dict[str, int] = {
    "bad_config": 2, "bad_job": 2, "bad_value": 2, "bad_request": 2, "bad_export": 2, "already_running": 2,
    "not_found": 3,
    "forbidden": 4, "quota": 4,
}


def exit_code(error_code: str) -> int:
    """0 success; 1 failure (daemon unreachable, I/O, corrupt data); 2 bad input or configuration;
    3 no such job or version; 4 not allowed (another user's job, over quota)."""
    return EXIT_CODES.get(error_code, 1)


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
    code = _main(argv)
    if "obstore" in sys.modules and argv is None:
        # obstore's Tokio runtime may still be closing connections when the interpreter finalizes, and a
        # worker thread that touches Python then aborts the process (SIGABRT after the command succeeded;
        # seen in ~1 of 3 short runs here). A command line that used it leaves without finalizing.
        import logging

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = COMMANDS[args.command].run(args)
        return code
    except AutosavedError as exc:
        print(f"autosaved {args.command}: {exc}", file=sys.stderr)
        return exit_code(exc.code)
    except KeyboardInterrupt:
        return 130
