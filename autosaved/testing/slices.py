"""CPU slices for the hostile-user run, laid out as systemd lays out a real host (root only).

On a host run by systemd the daemon's service lives in ``system.slice`` and each logged-in user's processes
in ``user.slice/user-UID.slice``; with the cpu controller on (systemd's default since cgroup v2), CPU time is
shared between those groups by weight, not between threads. So a user who starts five busy processes gets
one user's share of the CPU, not five threads' worth, and the daemon keeps its own share. A hostile run in
one flat cgroup instead measures how the kernel splits 2 cores between a dozen runnable threads, a
contention no daemon can change. ``hostile_user.py`` puts the daemon, the well-behaved user and the hostile
user each in their own group of equal weight when it can (cgroup v2 with the cpu controller, or a writable
cgroup v1 cpu hierarchy), and says which layout it measured.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class Slice:
    path: Path

    def join(self, pid: int) -> None:
        """Move process ``pid`` (all its threads) into this group; its later children are born in it."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def preexec(self) -> Callable[[], None]:
        """A ``preexec_fn`` that moves the new child into this group before it execs."""
        return lambda: self.join(os.getpid())


def _cpu_parent() -> tuple[Path, str] | None:
    """Where to make groups with the cpu controller, and that hierarchy's weight file; None if nowhere."""
    unified = CGROUP_ROOT / "cgroup.controllers"
    if unified.exists():
        mine = Path("/proc/self/cgroup").read_text().splitlines()
        rel = next((line.split(":", 2)[2] for line in mine if line.startswith("0::")), "/")
        parent = CGROUP_ROOT / rel.lstrip("/")
        if "cpu" in (parent / "cgroup.subtree_control").read_text().split():
            return parent, "cpu.weight"
        return None
    v1 = CGROUP_ROOT / "cpu"
    if (v1 / "cpu.shares").exists() and os.access(v1, os.W_OK):
        return v1, "cpu.shares"
    return None


def missing() -> str | None:
    """Why CPU slices cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root to make cgroups"
    try:
        where = _cpu_parent()
    except OSError as e:
        return f"cgroups unreadable: {e}"
    return None if where is not None else "no writable cgroup hierarchy with the cpu controller"


@contextmanager
def cpu_slices(names: tuple[str, ...], run_weight: int | None = None) -> Iterator[dict[str, Slice]]:
    """One group of equal CPU weight per name, under a parent group of this run; removed afterwards (their
    processes are moved back to the parent's parent first). ``run_weight`` is that parent's weight against
    the host's other work (in cgroup v2 units, 1-10000, default 100): a measurement on a shared host raises
    it so that other people's processes do not blur what the groups share among themselves."""
    where = _cpu_parent()
    if where is None:
        raise RuntimeError(missing() or "no cpu cgroups")
    base, weight_file = where
    top = base / f"autosaved-hostile-{secrets.token_hex(3)}"
    top.mkdir()
    if weight_file == "cpu.weight":  # v2: children get the cpu controller only if the parent delegates it
        (top / "cgroup.subtree_control").write_text("+cpu\n")
    if run_weight is not None:
        (top / weight_file).write_text(f"{run_weight if weight_file == 'cpu.weight' else run_weight * 1024 // 100}\n")
    made = {name: Slice(top / name) for name in names}
    try:
        for s in made.values():
            s.path.mkdir()
            (s.path / weight_file).write_text("100\n" if weight_file == "cpu.weight" else "1024\n")
        yield made
    finally:
        for s in made.values():
            _empty_into(s.path, base)
            s.path.rmdir()
        top.rmdir()


def _empty_into(group: Path, parent: Path) -> None:
    for pid in (group / "cgroup.procs").read_text().split():
        with contextlib.suppress(OSError):  # it exited meanwhile
            (parent / "cgroup.procs").write_text(f"{pid}\n")
