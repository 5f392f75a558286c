"""Record the file-system operations the storage layer makes, for the power-loss checker.

Switched on by ``AUTOSAVED_FSTRACE=<trace file>`` (``AUTOSAVED_FSTRACE_ROOT=<state dir>`` names the dir
whose ``jobs/`` subtree is recorded). :mod:`autosaved.storage.fsutil` calls :func:`install` at import
when the variable is set; production never sets it, and then this module is never imported.

:func:`install` interposes on the ``os`` functions the storage code calls (``open``, ``write``,
``pwrite``, ``fsync``, ``fdatasync``, ``close``, ``replace``/``rename``, ``unlink``, ``mkdir``, ``rmdir``,
``ftruncate``). Each call on a path or fd under the recorded tree runs under one lock together with the
append of its record, so the trace is a linearisation of what the threads of every daemon process that
shares the trace file did. Other processes (the workload) append ``mark`` records to the same file with
:func:`mark`; ``O_APPEND`` writes of one buffer are ordered with the daemon's, so a mark written after a
reply arrived follows every operation the reply depended on.

A record is one msgpack map; the file is their concatenation. Files are named by ``(st_dev, st_ino)``
(the checker turns those into identities, since inode numbers are reused); directories by path.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack

ENV = "AUTOSAVED_FSTRACE"
ENV_ROOT = "AUTOSAVED_FSTRACE_ROOT"

_lock = threading.RLock()
_installed = False
# fd → ("f", (dev, ino)) for files opened for writing, ("d", relpath) for directories.
_fds: dict[int, tuple[str, Any]] = {}
_orig: dict[str, Any] = {}
_trace_fd = -1
_root = ""


def _append(rec: dict[str, Any]) -> None:
    data = msgpack.packb(rec, use_bin_type=True)
    view = memoryview(data)
    # One write call per record: O_APPEND keeps each record whole and in order across processes.
    n = _orig["write"](_trace_fd, view)
    if n != len(data):  # pragma: no cover - a regular file takes small writes whole
        raise OSError(f"short write to the fs trace ({n} of {len(data)})")


def mark(trace_path: str, **fields: Any) -> None:
    """Append a workload event (sent request, ack received) to ``trace_path``."""
    data = msgpack.packb({"op": "mark", **fields}, use_bin_type=True)
    fd = os.open(trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _abs(path: Any, dir_fd: int | None) -> str:
    p = os.fsdecode(os.fspath(path))
    if dir_fd is not None and not os.path.isabs(p):
        p = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
    p = os.path.abspath(p)
    if not p.startswith(_root + "/"):
        # The recorded root is a real path; so is anything that reaches it through a symlink.
        head, tail = os.path.split(p)
        p = os.path.join(os.path.realpath(head), tail)
    return p


def _rel(path: str) -> str | None:
    """The path relative to the state dir when it lies in the recorded ``jobs`` tree, else None."""
    if not path.startswith(_root + "/"):
        return None
    rel = path[len(_root) + 1:]
    return rel if rel == "jobs" or rel.startswith("jobs/") else None


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    full = _abs(path, dir_fd)
    rel = _rel(full)
    if rel is None:
        return int(_orig["open"](path, flags, mode, dir_fd=dir_fd))
    with _lock:
        existed = os.path.lexists(full)
        fd = int(_orig["open"](path, flags, mode, dir_fd=dir_fd))
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            _fds[fd] = ("d", rel)
        elif flags & (os.O_WRONLY | os.O_RDWR):
            ino = [st.st_dev, st.st_ino]
            _fds[fd] = ("f", ino)
            if not existed:
                _append({"op": "create", "path": rel, "ino": ino})
            if flags & os.O_TRUNC and st.st_size == 0:
                _append({"op": "trunc", "ino": ino, "size": 0})
        return fd


def _write(fd: int, data: Any) -> int:
    entry = _fds.get(fd)
    if entry is None or entry[0] != "f":
        return int(_orig["write"](fd, data))
    with _lock:
        n = int(_orig["write"](fd, data))
        end = os.lseek(fd, 0, os.SEEK_CUR)
        _append({"op": "write", "ino": entry[1], "off": end - n, "data": bytes(memoryview(data).cast("B")[:n])})
        return n


def _pwrite(fd: int, data: Any, offset: int) -> int:
    entry = _fds.get(fd)
    if entry is None or entry[0] != "f":
        return int(_orig["pwrite"](fd, data, offset))
    with _lock:
        n = int(_orig["pwrite"](fd, data, offset))
        _append({"op": "write", "ino": entry[1], "off": offset, "data": bytes(memoryview(data).cast("B")[:n])})
        return n


def _sync(name: str, fd: Any) -> None:
    num = fd if isinstance(fd, int) else fd.fileno()
    entry = _fds.get(num)
    if entry is None:
        # Not opened through os.open (the log's torn-tail repair uses the builtin open and truncate):
        # record the file's size as a truncation, then the sync. The repair is the only such writer.
        try:
            rel = _rel(_fd_path(num))
        except OSError:
            rel = None
        if rel is None:
            _orig[name](fd)
            return
        with _lock:
            _orig[name](fd)
            st = os.fstat(num)
            if stat.S_ISDIR(st.st_mode):
                _append({"op": "fsyncdir", "path": rel})
            else:
                ino = [st.st_dev, st.st_ino]
                _append({"op": "trunc", "ino": ino, "size": st.st_size})
                _append({"op": "fsync", "ino": ino})
        return
    with _lock:
        _orig[name](fd)
        if entry[0] == "d":
            _append({"op": "fsyncdir", "path": entry[1]})
        else:
            _append({"op": "fsync", "ino": entry[1]})


def _fsync(fd: Any) -> None:
    _sync("fsync", fd)


def _fdatasync(fd: Any) -> None:
    _sync("fdatasync", fd)


def _close(fd: int) -> None:
    if fd in _fds:
        with _lock:
            _fds.pop(fd, None)
            _orig["close"](fd)
        return
    _orig["close"](fd)


def _ftruncate(fd: int, length: int) -> None:
    entry = _fds.get(fd)
    if entry is None or entry[0] != "f":
        _orig["ftruncate"](fd, length)
        return
    with _lock:
        _orig["ftruncate"](fd, length)
        _append({"op": "trunc", "ino": entry[1], "size": length})


def _make_rename(name: str) -> Any:
    def _rename(src: Any, dst: Any, *, src_dir_fd: int | None = None, dst_dir_fd: int | None = None) -> None:
        s, d = _abs(src, src_dir_fd), _abs(dst, dst_dir_fd)
        rs, rd = _rel(s), _rel(d)
        if rs is None and rd is None:
            _orig[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            return
        with _lock:
            _orig[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            _append({"op": "rename", "src": rs, "dst": rd})
    return _rename


def _make_path_op(name: str, op: str) -> Any:
    def _path_op(path: Any, *args: Any, dir_fd: int | None = None) -> None:
        full = _abs(path, dir_fd)
        rel = _rel(full)
        if rel is None:
            _orig[name](path, *args, dir_fd=dir_fd)
            return
        with _lock:
            _orig[name](path, *args, dir_fd=dir_fd)
            _append({"op": op, "path": rel})
    return _path_op


_NAMES = ("open", "write", "pwrite", "fsync", "fdatasync", "close", "replace", "rename", "unlink", "remove",
          "mkdir", "rmdir", "ftruncate")


def install(trace: str | None = None, root: str | None = None) -> None:
    """Start recording into ``trace`` (default ``$AUTOSAVED_FSTRACE``) the operations under ``root``
    (default ``$AUTOSAVED_FSTRACE_ROOT``). Idempotent."""
    global _installed, _trace_fd, _root
    if _installed:
        return
    trace = trace or os.environ[ENV]
    _root = os.path.realpath(root or os.environ.get(ENV_ROOT, "."))
    for name in _NAMES:
        _orig[name] = getattr(os, name)
    _trace_fd = _orig["open"](trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.open = _open
    os.write = _write
    os.pwrite = _pwrite
    os.fsync = _fsync
    os.fdatasync = _fdatasync
    os.close = _close
    os.ftruncate = _ftruncate
    os.replace = _make_rename("replace")
    os.rename = _make_rename("rename")
    os.unlink = _make_path_op("unlink", "unlink")
    os.remove = _make_path_op("remove", "unlink")
    os.mkdir = _make_path_op("mkdir", "mkdir")
    os.rmdir = _make_path_op("rmdir", "rmdir")
    _installed = True


def uninstall() -> None:
    """Put the ``os`` functions back and close the trace."""
    global _installed
    if not _installed:
        return
    for name in _NAMES:
        setattr(os, name, _orig[name])
    os.close(_trace_fd)
    _fds.clear()
    _installed = False


@contextmanager
def recording(trace: str | Path, root: str | Path) -> Iterator[None]:
    """Record this process's operations under ``root`` into ``trace`` for the duration of the block."""
    install(str(trace), str(root))
    try:
        yield
    finally:
        uninstall()


def read_trace(path: str) -> list[dict[str, Any]]:
    """Every record of a trace file, in order (a torn last record, from a SIGKILL, is dropped)."""
    with open(path, "rb") as fh:
        data = fh.read()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1 << 20))
    unpacker.feed(data)
    out: list[dict[str, Any]] = []
    try:
        for rec in unpacker:
            out.append(rec)
    except Exception:  # pragma: no cover - only a torn final record can fail
        pass
    return out
