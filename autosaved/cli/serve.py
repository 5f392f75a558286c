"""``autosaved serve``: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..config import load_config


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="run the daemon in the foreground")
    p.add_argument("--address", help="ipc:// or tcp:// address to listen on")
    p.add_argument("--state-dir", help="where versions are stored")
    p.add_argument("--config", help="TOML config file (default: $AUTOSAVED_CONFIG, then /etc/autosaved/autosaved.toml)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def run(args: argparse.Namespace) -> int:
    from ..daemon.app import serve

    config = load_config(config_file=args.config, address=args.address, state_dir=args.state_dir)
    setup_logging(args.log_level or config.log_level)
    return serve(config)
