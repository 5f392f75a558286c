"""The filesystem's atomic primitives, used the one correct way: write a temp file in the same
filesystem, fsync it, rename it over the target, fsync the directory that holds the name."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

from . import fileops
from .faults import point
from .fileops import pwrite_all

__all__ = ["Pacer", "SYNC_EVERY", "WRITE_PIECE", "atomic_write", "fsync_dir", "make_dirs", "pwrite_all", "read_exact",
           "rename", "temp_name", "write_fsync"]

# Called by writers with the number of bytes about to be written; it may block (it runs in a worker
# thread) to hold a save to the rate the I/O throttle allows.
Pacer = Callable[[int], None]
# Writes go to the kernel in pieces of this size, so a pacer can interleave them with others' I/O.
WRITE_PIECE = 1024 * 1024
# A paced write syncs at least this often, so a large chunk (chunk_size allows up to 1 GiB) never leaves
# more than this much dirty page cache for the kernel to flush in one stall.
SYNC_EVERY = 8 * 1024 * 1024


def fsync_dir(path: Path, kind: str = "dir") -> None:
    point(kind, "fsync_dir", "before", path)
    fileops.fsync_dir(path)
    point(kind, "fsync_dir", "after", path)


# Directories whose entry (and every ancestor's) this process has fsynced: see make_dirs.
_durable_dirs: set[Path] = set()


def make_dirs(path: Path, mode: int = 0o750) -> None:
    """Create ``path`` and any missing parents, fsyncing each new entry's parent so the new directory
    survives a crash along with what is written into it.

    A directory that already exists may have been made by a process that died (or failed) between its
    ``mkdir`` and the fsync of its parent, so its name may still vanish at a power cut, taking everything
    inside with it. So the first call for a path in this process also fsyncs the parent of every existing
    component up to the file system root; later calls cost one set lookup."""
    missing = []
    p = path.absolute()
    while not p.is_dir():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        fileops.mkdir(d, mode, exist_ok=True)
        fsync_dir(d.parent)
        _durable_dirs.add(d)
    while p not in _durable_dirs and p.parent != p:
        try:
            fsync_dir(p.parent)
        except PermissionError:
            break  # an ancestor we may not open (mode 0711): its entries are the admin's, not ours
        _durable_dirs.add(p)
        p = p.parent


def write_fsync(path: Path, pieces: Iterable[bytes | memoryview], mode: int = 0o640, *,
                pace: Pacer | None = None, drop_cache: bool = False, kind: str = "chunk") -> int:
    """Create ``path`` (must not exist), write ``pieces``, fsync; returns bytes written.

    With ``pace``, data goes out in ``WRITE_PIECE`` slices, each announced to the pacer first, and is
    ``fdatasync``ed every ``SYNC_EVERY`` bytes. With ``drop_cache``, the file's pages are dropped from
    the page cache once durable, so checkpoint bytes do not evict the trainer's own cached data. On any
    error the partial file is removed, so a failed write never leaves a file that looks whole.
    """
    point(kind, "open", "before", path)
    fd = fileops.open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    written = unsynced = 0
    try:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view.nbytes:
                if pace is not None:
                    pace(min(view.nbytes, WRITE_PIECE))
                point(kind, "write", "before", path)
                n = fileops.write(fd, view[:WRITE_PIECE] if pace is not None else view, kind, path)
                written += n
                unsynced += n
                view = view[n:]
                point(kind, "write", "after", path)
                if pace is not None and unsynced >= SYNC_EVERY and view.nbytes:
                    fileops.fdatasync(fd)
                    unsynced = 0
                    if drop_cache:
                        os.posix_fadvise(fd, 0, written, os.POSIX_FADV_DONTNEED)
        point(kind, "fsync", "before", path)
        fileops.fsync(fd)
        point(kind, "fsync", "after", path)
        if drop_cache:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except BaseException:
        fileops.close(fd)
        fileops.unlink(path, missing_ok=True)
        raise
    fileops.close(fd)
    return written


def temp_name(directory: Path, stem: str) -> Path:
    return directory / f".{stem}.{secrets.token_hex(6)}.tmp"


def rename(src: Path, dst: Path, kind: str) -> None:
    point(kind, "rename", "before", dst)
    fileops.replace(src, dst)
    point(kind, "rename", "after", dst)


def atomic_write(target: Path, data: bytes, tmp_dir: Path, mode: int = 0o640, kind: str = "manifest") -> None:
    """Make ``target`` contain ``data`` atomically and durably (temp, fsync, rename, fsync dir)."""
    tmp = temp_name(tmp_dir, target.name)
    write_fsync(tmp, [data], mode, kind=kind)
    try:
        rename(tmp, target, kind)
    except BaseException:
        fileops.unlink(tmp, missing_ok=True)
        raise
    fsync_dir(target.parent, kind)


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
