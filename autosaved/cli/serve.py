"""``autosaved serve``: run the daemon in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from ..config import load_config
from ..logfmt import FORMATS, formatter


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="run the daemon in the foreground")
    p.add_argument("--address", help="ipc:// or tcp:// address to listen on")
    p.add_argument("--state-dir", help="where versions are stored")
    p.add_argument("--config", help="TOML config file (default: $AUTOSAVED_CONFIG, then /etc/autosaved/autosaved.toml)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=FORMATS,
                   help="text (key=value lines, the default) or json (one object per line, for log shippers)")


def setup_logging(level: str, kind: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(kind))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def run(args: argparse.Namespace) -> int:
    from ..daemon.app import serve

    config = load_config(config_file=args.config, address=args.address, state_dir=args.state_dir)
    setup_logging(args.log_level or config.log_level, args.log_format or config.log_format)
    return serve(config)
