"""``autosaved export JOB --out DIR``: a stored version (default: the newest committed one) as a portable
folder (safetensors + JSON, see :mod:`.exchange`) that ``autosaved import`` reads back exactly."""

from __future__ import annotations

import argparse
from typing import Any

from . import restore


def add_parser(sub: Any, name: str) -> None:
    restore.add_arguments(sub.add_parser(name, help="export a stored version to a portable folder"))


def run(args: argparse.Namespace) -> int:
    return restore.export(args, live=False, verb="export")
