"""A plug-in for the file-operations seam that forces one thread interleaving of a recorded daemon: the
one behind issue 19's power-loss flake, so a test meets it every time instead of once in many busy runs.

A save's chunk renames run on two syncer threads (:mod:`autosaved.storage.chunkwriter`). The power-loss
workload kills the daemon with ``chunk.rename.after 2 crash``: right after the second chunk rename, in
the thread that made it. If the other syncer has just renamed its chunk in and not yet appended the record
when that SIGKILL lands, the rename is on disk (the restarted daemon's recovery save dedups the chunk)
but not in the trace, unless the recorder's ``crash`` waits for it (:mod:`.fstrace`).

Installed as the seam's plug-in (``AUTOSAVED_FILEOPS=autosaved.testing.preempt:install``, with the
recorder's environment, :func:`.fstrace.daemon_env`), while the fault file holds a ``crash`` rule:

- renames into ``objects/`` happen in the order their temp files were created (so the second one, X's,
  is never the one the writing thread waits for before it writes the next chunk);
- the second rename into ``objects/`` (thread X), once recorded, waits until another rename into
  ``objects/`` has reached the disk (at most :data:`WAIT` seconds);
- that rename (thread Y) stalls :data:`STALL` seconds after it reached the disk and before the recorder
  appends its record (a thread the scheduler preempted there), and names itself in
  ``<fault file>.preempted``, so a test knows the interleaving happened.

X then reaches the fault point and the crash fires while Y is between its rename and its record.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from ..storage import fileops
from ..storage.fileops import FileOps, StrPath
from . import fstrace

STALL = 1.0
WAIT = 10.0


class _State:
    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.renames = 0
        self.x_done = False
        self.later = threading.Event()
        self.faults = os.environ.get("AUTOSAVED_FAULTS_FILE", "")
        self.pending: list[str] = []  # temp files created while armed, oldest first, not yet renamed or gone

    def armed(self) -> bool:
        try:
            with open(self.faults) as fh:
                return "crash" in fh.read()
        except OSError:
            return False

    def gone(self, path: str) -> None:
        with self.lock:
            if path in self.pending:
                self.pending.remove(path)
                self.lock.notify_all()


def _into_objects(dst: StrPath) -> bool:
    return f"{os.sep}objects{os.sep}" in os.fsdecode(os.fspath(dst))


class _Stalling(FileOps):
    """Under the recorder: Y's rename reaches the disk, then Y stalls before the recorder's append."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def replace(self, src: StrPath, dst: StrPath) -> None:
        super().replace(src, dst)
        s = self.state
        if s.x_done and _into_objects(dst) and not s.later.is_set():
            with open(s.faults + ".preempted", "a") as fh:
                fh.write(f"{os.fsdecode(os.fspath(dst))}\n")
            s.later.set()
            time.sleep(STALL)


class _Waiting(FileOps):
    """Over the recorder: renames in creation order; X's rename is recorded, then X waits for Y before it
    reaches its fault point."""

    def __init__(self, inner: FileOps, state: _State) -> None:
        self.inner = inner
        self.state = state

    def __getattribute__(self, name: str) -> Any:
        if name in ("open", "replace", "unlink", "inner", "state"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "inner"), name)

    def open(self, path: StrPath, flags: int, mode: int = 0o640) -> int:
        fd = self.inner.open(path, flags, mode)
        if flags & os.O_EXCL and self.state.armed():
            with self.state.lock:
                self.state.pending.append(os.fsdecode(os.fspath(path)))
        return fd

    def unlink(self, path: StrPath) -> None:
        self.inner.unlink(path)
        self.state.gone(os.fsdecode(os.fspath(path)))

    def replace(self, src: StrPath, dst: StrPath) -> None:
        s = self.state
        name = os.fsdecode(os.fspath(src))
        n = 0
        if _into_objects(dst) and s.armed():
            with s.lock:
                s.lock.wait_for(lambda: name not in s.pending or s.pending.index(name) == 0, WAIT)
                s.renames += 1
                n = s.renames
        try:
            self.inner.replace(src, dst)
        finally:
            s.gone(name)
        if n == 2:
            s.x_done = True
            s.later.wait(WAIT)


def install() -> None:
    """Stalling operations, the recorder over them, the waiting ones over the recorder."""
    state = _State()
    fileops.install(_Stalling(state))
    fstrace.install()
    fileops.install(_Waiting(fileops.ops, state))


def daemon_env(trace: str, root: str) -> dict[str, str]:
    """The recorder's environment with this plug-in in its place (it installs the recorder itself)."""
    return {**fstrace.daemon_env(trace, root), fileops.PLUGIN_ENV: f"{__name__}:install"}
