"""Options every client command shares, and output helpers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..client.core import ClientCore, Request
from ..client.sync import Client
from ..config import discover_state_dir


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="daemon address (default: $AUTOSAVED_ADDRESS, then the user's socket)")
    parser.add_argument("--state-dir", type=Path, help="state dir, for commands that read it directly "
                        "(default: $AUTOSAVED_STATE_DIR, then the user's default)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")


def state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else discover_state_dir()


class AdminClient(Client):
    """A Client for requests that are not about one job (status of all jobs, list)."""

    def __init__(self, args: argparse.Namespace, job: str = "_cli") -> None:
        super().__init__(job, address=args.address, timeout=args.timeout)

    def __enter__(self) -> AdminClient:
        self.connect()
        return self

    def connect(self) -> dict[str, Any]:
        # A ping, not a hello: a hello would register the placeholder job with the daemon.
        result: dict[str, Any] = self._call(self._core.ping())
        return result

    def call(self, build: Any) -> Any:
        core: ClientCore = self._core
        req: Request = build(core)
        return self._call(req)


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
