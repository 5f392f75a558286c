"""Real local users for the tests and scripts that act as another user would (root only): ``useradd``d
here, in a group of their own that the daemon's socket is given to, and removed afterwards."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run as this user (``setpriv``), with the caller's environment."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *argv]

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        """A Python process as this user running ``code`` with ``args`` in its ``sys.argv[1:]`` (it imports
        the same autosaved as the caller: same interpreter, same environment)."""
        env = {**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", **kwargs.pop("env", {})}
        return subprocess.Popen(self.command([sys.executable, "-c", code, *args]), env=env, **kwargs)


def missing() -> str | None:
    """Why real users cannot be made here, or None."""
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        return "needs root with useradd and setpriv, to create real users and run clients as them"
    return None


@contextmanager
def real_users(count: int) -> Iterator[tuple[list[User], str]]:
    """``count`` new users, members of one new group (the name yielded with them)."""
    tag = secrets.token_hex(3)
    group = f"asg{tag}"
    subprocess.run(["groupadd", group], check=True)
    made: list[User] = []
    try:
        for i in range(count):
            name = f"as{i}{tag}"
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", group, name],
                           check=True)
            pw = pwd.getpwnam(name)
            made.append(User(name, pw.pw_uid, pw.pw_gid))
        yield made, group
    finally:
        for u in made:
            subprocess.run(["userdel", u.name], check=False)
        subprocess.run(["groupdel", group], check=False)
