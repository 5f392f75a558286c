"""The one seam for durable file I/O: every operation of the storage layer that changes what a crash
leaves on disk (local chunks and manifests, the log's segments, the bucket seed's chunk files, job
folders) goes through the functions here, never through ``os`` directly.

So whatever observes or perturbs that I/O plugs in at one place: the fault injector's mid-write point
(:mod:`.faults`, ``<kind>.write.middle``) lives in :func:`write`, and the power-loss checker's recorder
(:mod:`autosaved.testing.fstrace`) replaces :data:`ops` with a recording wrapper. Nothing here imports
the test tools: a process that must record from its start names a plug-in in ``AUTOSAVED_FILEOPS``
(``module:function``, called once at import with no arguments); production never sets it.

Reads are not part of the seam: they change nothing a crash could leave behind.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
from pathlib import Path

from . import faults

PLUGIN_ENV = "AUTOSAVED_FILEOPS"
StrPath = str | Path


class FileOps:
    """The operations, as the operating system does them. A plug-in subclasses or wraps this."""

    def open(self, path: StrPath, flags: int, mode: int = 0o640) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def ftruncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        os.replace(src, dst)

    def unlink(self, path: StrPath) -> None:
        os.unlink(path)

    def mkdir(self, path: StrPath, mode: int) -> None:
        os.mkdir(path, mode)

    def rmdir(self, path: StrPath) -> None:
        os.rmdir(path)

    def crash(self) -> None:
        """Die at once (SIGKILL to this process): the fault injector's ``crash``. Part of the seam so a
        plug-in that records the operations can make the death fall between two of them, never inside
        one (see :mod:`autosaved.testing.fstrace`)."""
        os.kill(os.getpid(), signal.SIGKILL)


ops: FileOps = FileOps()


def install(new: FileOps) -> FileOps:
    """Make ``new`` the operations every storage call uses; returns the previous ones (to put back)."""
    global ops
    old, ops = ops, new
    return old


def open_fd(path: StrPath, flags: int, mode: int = 0o640) -> int:
    return ops.open(path, flags, mode)


def write(fd: int, data: memoryview, kind: str, detail: object = "") -> int:
    """One ``write``; with fault injection on, the point ``<kind>.write.middle`` fires once half of
    ``data`` is in the file, and the call then writes the rest (a short write, never a duplicate)."""
    rule = faults.due(kind, "write", "middle") if faults.active() and data.nbytes > 1 else None
    if rule is None:
        return ops.write(fd, data)
    half = data.nbytes // 2
    done = 0
    while done < half:  # really in the file (the page cache) before the fault fires
        done += ops.write(fd, data[done:half])
    faults.fire(rule, f"{kind}.write.middle {detail} after {done} of {data.nbytes} bytes")
    return done + ops.write(fd, data[done:])


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` to ``fd`` at ``offset`` (``pwrite`` may write less than asked)."""
    view = data.cast("B")
    while view.nbytes:
        n = ops.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fsync(fd: int) -> None:
    ops.fsync(fd)


def fdatasync(fd: int) -> None:
    ops.fdatasync(fd)


def close(fd: int) -> None:
    ops.close(fd)


def replace(src: StrPath, dst: StrPath) -> None:
    ops.replace(src, dst)


def unlink(path: StrPath, *, missing_ok: bool = False) -> None:
    try:
        ops.unlink(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def mkdir(path: StrPath, mode: int = 0o750, *, exist_ok: bool = False) -> None:
    try:
        ops.mkdir(path, mode)
    except FileExistsError:
        if not (exist_ok and os.path.isdir(path)):
            raise


def rmtree(path: StrPath) -> None:
    """Remove a folder and everything in it, bottom-up, ignoring what vanished meanwhile."""
    for top, dirs, files in os.walk(path, topdown=False):
        for name in files:
            unlink(os.path.join(top, name), missing_ok=True)
        for name in dirs:
            full = os.path.join(top, name)
            if os.path.islink(full):
                unlink(full, missing_ok=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    ops.rmdir(full)
    with contextlib.suppress(FileNotFoundError):
        ops.rmdir(path)


def crash() -> None:
    ops.crash()


def fsync_dir(path: StrPath) -> None:
    fd = ops.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ops.fsync(fd)
    finally:
        ops.close(fd)


def truncate_fsync(path: StrPath, size: int | None) -> None:
    """Cut ``path`` to ``size`` bytes (``None``: keep its length) and make its contents durable."""
    fd = ops.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if size is not None:
            ops.ftruncate(fd, size)
        ops.fsync(fd)
    finally:
        ops.close(fd)


def write_new(tmp: StrPath, data: bytes | memoryview, final: StrPath, dir_mode: int = 0o750) -> None:
    """Write ``data`` to the new file ``tmp``, fsync it, and rename it to ``final`` (whose folder is made
    if missing). The caller fsyncs the folders once for many files."""
    mkdir(os.path.dirname(final), dir_mode, exist_ok=True)
    fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data).cast("B")
        while view.nbytes:
            view = view[ops.write(fd, view):]
        ops.fsync(fd)
    except BaseException:
        ops.close(fd)
        unlink(tmp, missing_ok=True)
        raise
    ops.close(fd)
    try:
        ops.replace(tmp, final)
    except BaseException:
        unlink(tmp, missing_ok=True)
        raise


def _load_plugin() -> None:
    spec = os.environ.get(PLUGIN_ENV)
    if not spec:
        return
    module, _, func = spec.partition(":")
    getattr(importlib.import_module(module), func or "install")()


_load_plugin()
