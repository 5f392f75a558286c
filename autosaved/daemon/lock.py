"""Exclusive locks that keep two daemons off one state dir or one socket.

libzmq's ipc bind silently unlinks an existing socket file, so without a lock a second daemon would
steal the first one's clients. ``flock`` locks die with the process, so a SIGKILLed daemon never
leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from ..errors import AlreadyRunning, AutosavedError


class PidLock:
    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> None:
        # O_NOFOLLOW: a symlink planted in place of the lock file must not make the daemon (often root)
        # truncate and write whatever file it points at.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise AutosavedError(f"{self.path} is a symbolic link; refusing to use it as a lock file") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another autosaved daemon (pid {holder}) is already using {self.what}; stop it first "
                f"(lock file {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
