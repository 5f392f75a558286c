"""Placeholder until the throttle benchmark lands on main; it is registered so both can be built in parallel."""

from __future__ import annotations

import argparse

from ..errors import AutosavedError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="64MiB")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    raise AutosavedError("the throttle benchmark is not built yet")
