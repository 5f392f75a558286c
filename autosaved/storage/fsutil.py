"""The filesystem's atomic primitives, used the one correct way: write a temp file in the same
filesystem, fsync it, rename it over the target, fsync the directory that holds the name."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_fsync(path: Path, pieces: Iterable[bytes | memoryview], mode: int = 0o640) -> int:
    """Create ``path`` (must not exist), write ``pieces``, fsync; returns bytes written.

    On any error the partial file is removed, so a failed write never leaves a file that looks whole.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    written = 0
    try:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view.nbytes:
                n = os.write(fd, view)
                written += n
                view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return written


def temp_name(directory: Path, stem: str) -> Path:
    return directory / f".{stem}.{secrets.token_hex(6)}.tmp"


def atomic_write(target: Path, data: bytes, tmp_dir: Path, mode: int = 0o640) -> None:
    """Make ``target`` contain ``data`` atomically and durably (temp, fsync, rename, fsync dir)."""
    tmp = temp_name(tmp_dir, target.name)
    write_fsync(tmp, [data], mode)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def read_exact(path: Path, size: int, into: memoryview) -> None:
    """Read exactly ``size`` bytes of ``path`` into ``into``; ``OSError`` if the file is shorter or longer."""
    with path.open("rb", buffering=0) as fh:
        got = 0
        while got < size:
            n = fh.readinto(into[got:size])
            if not n:
                raise OSError(f"{path} is truncated: {got} of {size} bytes")
            got += n
        if fh.read(1):
            raise OSError(f"{path} is longer than the {size} bytes its manifest records")
