"""Job names: the one rule every layer shares (the SDK checks early, the daemon checks what it receives,
storage checks before a name becomes a directory)."""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from .errors import InvalidJobName

MAX_JOB_NAME: Final = 128
_JOB_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@+=,-]*$")
# The same set, matched whole (``$`` would also let a trailing newline through): ASCII only, so a match
# has no control characters, no separators and is neither "." nor "..".
_JOB_NAME_FULL = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+=,-]*")


def validate_job_name(name: object) -> str:
    """Return ``name`` if it is a safe job name, else raise :class:`InvalidJobName` saying why.

    A job name becomes a directory name, so it must not be able to point anywhere else: letters,
    digits and ``_ . @ + = , -``, not starting with a dot or dash, at most 128 characters.
    """
    # Every request names its job: the one whole-string match below passes a good name without the
    # per-character checks (which only exist to say what is wrong with a bad one).
    if type(name) is str and len(name) <= MAX_JOB_NAME and _JOB_NAME_FULL.fullmatch(name):
        return name
    if not isinstance(name, str):
        raise InvalidJobName(f"job name must be a string, not {type(name).__name__}")
    if not name:
        raise InvalidJobName("job name is empty")
    if len(name) > MAX_JOB_NAME:
        raise InvalidJobName(f"job name is {len(name)} characters long; the limit is {MAX_JOB_NAME}")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise InvalidJobName(f"job name {name!r} contains control characters")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise InvalidJobName(f"job name {name!r} contains a path separator or is a relative path")
    if not _JOB_NAME.match(name):
        raise InvalidJobName(
            f"job name {name!r} may only use letters, digits and _ . @ + = , - and must start with a "
            "letter, digit or _"
        )
    return name
