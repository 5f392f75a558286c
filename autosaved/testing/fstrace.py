"""Record the file-system operations the storage layer makes, for the power-loss checker.

The recorder plugs into the storage layer's one seam for durable I/O (:mod:`autosaved.storage.fileops`):
:func:`install` wraps its operations (``open``, ``write``, ``pwrite``, ``fsync``, ``fdatasync``,
``ftruncate``, ``close``, ``replace``, ``unlink``, ``mkdir``, ``rmdir``, and the fault injector's
``crash``), so every durable operation of the storage code is seen (the log's segments and repairs, the
bucket seed's chunk files included) and nothing else is patched. A daemon records from its start when its
environment names this module's :func:`install` as the seam's plug-in
(``AUTOSAVED_FILEOPS=autosaved.testing.fstrace:install``) with ``AUTOSAVED_FSTRACE=<trace file>`` and
``AUTOSAVED_FSTRACE_ROOT=<state dir>`` (whose ``jobs/`` subtree is recorded): :data:`DAEMON_ENV` builds
that environment. Production never sets them.

Each call on a path or fd under the recorded tree runs under one lock together with the append of its
record, so the trace is a linearisation of what the threads of every daemon process that shares the
trace file did. A fault's ``crash`` takes that lock before the process dies, so no operation is ever on
disk (where a restarted daemon builds on it) but missing from the trace. Other processes (the workload)
append ``mark`` records to the same file with :func:`mark`; ``O_APPEND`` writes of one buffer are ordered
with the daemon's, so a mark written after a reply arrived follows every operation the reply depended on.

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

from ..storage import fileops
from ..storage.fileops import FileOps, StrPath

ENV = "AUTOSAVED_FSTRACE"
ENV_ROOT = "AUTOSAVED_FSTRACE_ROOT"


def daemon_env(trace: str, root: str) -> dict[str, str]:
    """The environment that makes a daemon record into ``trace`` from its start."""
    return {ENV: trace, ENV_ROOT: root, fileops.PLUGIN_ENV: f"{__name__}:install"}


def mark(trace_path: str, **fields: Any) -> None:
    """Append a workload event (sent request, ack received) to ``trace_path``."""
    data = msgpack.packb({"op": "mark", **fields}, use_bin_type=True)
    fd = os.open(trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class Recorder(FileOps):
    """The seam's operations, each recorded when it touches the recorded tree."""

    def __init__(self, inner: FileOps, trace: str, root: str) -> None:
        self.inner = inner
        self.root = os.path.realpath(root)
        self.lock = threading.RLock()
        # fd -> ("f", (dev, ino)) for files opened for writing, ("d", relpath) for directories.
        self.fds: dict[int, tuple[str, Any]] = {}
        self.trace_fd = os.open(trace, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _append(self, rec: dict[str, Any]) -> None:
        data = msgpack.packb(rec, use_bin_type=True)
        # One write call per record: O_APPEND keeps each record whole and in order across processes.
        n = os.write(self.trace_fd, data)
        if n != len(data):  # pragma: no cover - a regular file takes small writes whole
            raise OSError(f"short write to the fs trace ({n} of {len(data)})")

    def _rel(self, path: StrPath) -> str | None:
        """The path relative to the state dir when it lies in the recorded ``jobs`` tree, else None."""
        p = os.path.abspath(os.fsdecode(os.fspath(path)))
        if not p.startswith(self.root + "/"):
            # The recorded root is a real path; so is anything that reaches it through a symlink.
            head, tail = os.path.split(p)
            p = os.path.join(os.path.realpath(head), tail)
        if not p.startswith(self.root + "/"):
            return None
        rel = p[len(self.root) + 1:]
        return rel if rel == "jobs" or rel.startswith("jobs/") else None

    def open(self, path: StrPath, flags: int, mode: int = 0o640) -> int:
        rel = self._rel(path)
        if rel is None:
            return self.inner.open(path, flags, mode)
        with self.lock:
            existed = os.path.lexists(path)
            fd = self.inner.open(path, flags, mode)
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                self.fds[fd] = ("d", rel)
            elif flags & (os.O_WRONLY | os.O_RDWR):
                ino = [st.st_dev, st.st_ino]
                self.fds[fd] = ("f", ino)
                if not existed:
                    self._append({"op": "create", "path": rel, "ino": ino})
                if flags & os.O_TRUNC and st.st_size == 0:
                    self._append({"op": "trunc", "ino": ino, "size": 0})
            return fd

    def write(self, fd: int, data: memoryview) -> int:
        entry = self.fds.get(fd)
        if entry is None or entry[0] != "f":
            return self.inner.write(fd, data)
        with self.lock:
            n = self.inner.write(fd, data)
            end = os.lseek(fd, 0, os.SEEK_CUR)
            self._append({"op": "write", "ino": entry[1], "off": end - n,
                          "data": bytes(memoryview(data).cast("B")[:n])})
            return n

    def pwrite(self, fd: int, data: memoryview, offset: int) -> int:
        entry = self.fds.get(fd)
        if entry is None or entry[0] != "f":
            return self.inner.pwrite(fd, data, offset)
        with self.lock:
            n = self.inner.pwrite(fd, data, offset)
            self._append({"op": "write", "ino": entry[1], "off": offset,
                          "data": bytes(memoryview(data).cast("B")[:n])})
            return n

    def _sync(self, fd: int, real: Any) -> None:
        entry = self.fds.get(fd)
        if entry is None:
            real(fd)
            return
        with self.lock:
            real(fd)
            if entry[0] == "d":
                self._append({"op": "fsyncdir", "path": entry[1]})
            else:
                self._append({"op": "fsync", "ino": entry[1]})

    def fsync(self, fd: int) -> None:
        self._sync(fd, self.inner.fsync)

    def fdatasync(self, fd: int) -> None:
        self._sync(fd, self.inner.fdatasync)

    def ftruncate(self, fd: int, size: int) -> None:
        entry = self.fds.get(fd)
        if entry is None or entry[0] != "f":
            self.inner.ftruncate(fd, size)
            return
        with self.lock:
            self.inner.ftruncate(fd, size)
            self._append({"op": "trunc", "ino": entry[1], "size": size})

    def close(self, fd: int) -> None:
        if fd in self.fds:
            with self.lock:
                self.fds.pop(fd, None)
                self.inner.close(fd)
            return
        self.inner.close(fd)

    def replace(self, src: StrPath, dst: StrPath) -> None:
        rs, rd = self._rel(src), self._rel(dst)
        if rs is None and rd is None:
            self.inner.replace(src, dst)
            return
        with self.lock:
            self.inner.replace(src, dst)
            self._append({"op": "rename", "src": rs, "dst": rd})

    def _path_op(self, op: str, path: StrPath, real: Any, *args: Any) -> None:
        rel = self._rel(path)
        if rel is None:
            real(path, *args)
            return
        with self.lock:
            real(path, *args)
            self._append({"op": op, "path": rel})

    def unlink(self, path: StrPath) -> None:
        self._path_op("unlink", path, self.inner.unlink)

    def mkdir(self, path: StrPath, mode: int) -> None:
        self._path_op("mkdir", path, self.inner.mkdir, mode)

    def rmdir(self, path: StrPath) -> None:
        self._path_op("rmdir", path, self.inner.rmdir)

    def crash(self) -> None:
        # Die holding the lock, so no other thread is between an operation and its record. A rename done
        # but not yet recorded when a fault's SIGKILL landed was on disk for the restarted daemon (whose
        # recovery save dedup'd the chunk) and missing from every crash state the checker built: a
        # version half-visible even with every un-synced change kept (issue 19's power-loss flake).
        self.lock.acquire()
        self.inner.crash()


_recorder: Recorder | None = None


def install(trace: str | None = None, root: str | None = None) -> None:
    """Start recording into ``trace`` (default ``$AUTOSAVED_FSTRACE``) the storage layer's operations
    under ``root`` (default ``$AUTOSAVED_FSTRACE_ROOT``), by wrapping the seam. Idempotent."""
    global _recorder
    if _recorder is not None:
        return
    rec = Recorder(fileops.ops, trace or os.environ[ENV], root or os.environ.get(ENV_ROOT, "."))
    fileops.install(rec)
    _recorder = rec


def uninstall() -> None:
    """Put the seam's previous operations back and close the trace."""
    global _recorder
    if _recorder is None:
        return
    fileops.install(_recorder.inner)
    os.close(_recorder.trace_fd)
    _recorder = None


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
