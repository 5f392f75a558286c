"""Reading the I/O counters the throttle controller needs, for the disks under the state dir.

Every reader degrades to ``None`` instead of failing: containers often hide ``/sys/block`` or mount
the state dir on overlayfs (an anonymous device with no counters), and older kernels lack PSI.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import psutil

from ..throttle import IoSample

log = logging.getLogger("autosaved.iosampler")
SYS = Path("/sys")
PROC = Path("/proc")


def disks_under(path: Path, sys_root: Path = SYS) -> list[str]:
    """Names of the whole disks (as psutil and /proc/diskstats name them) holding ``path``.

    ``st_dev`` → ``/sys/dev/block/MAJ:MIN``; a partition is replaced by its disk (``sda1`` → ``sda``,
    ``nvme0n1p2`` → ``nvme0n1``); a device-mapper or md device by the disks under it (``slaves/``,
    recursively: LVM on LUKS on a partition resolves to the disk). Utilisation is a whole-disk fact,
    so partitions would undercount others' traffic.
    """
    try:
        st = os.stat(path)
    except OSError:
        return []
    node = sys_root / "dev" / "block" / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    try:
        device = node.resolve(strict=True)
    except OSError:
        return []  # overlayfs, tmpfs, NFS: no block device
    return sorted(set(_whole_disks(device, depth=0)))


def _whole_disks(device: Path, depth: int) -> list[str]:
    if depth > 8:
        return []
    slaves = device / "slaves"
    try:
        below = sorted(slaves.iterdir()) if slaves.is_dir() else []
    except OSError:
        below = []
    if below:
        out: list[str] = []
        for s in below:
            try:
                out += _whole_disks(s.resolve(strict=True), depth + 1)
            except OSError:
                continue
        return out
    if (device / "partition").exists():
        return [device.parent.name]
    return [device.name]


def read_psi(proc_root: Path = PROC) -> tuple[float | None, float | None]:
    """``some`` and ``full`` avg10 of /proc/pressure/io, in percent."""
    try:
        text = (proc_root / "pressure" / "io").read_text()
    except OSError:
        return None, None
    found: dict[str, float] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        for field in rest.split():
            name, _, value = field.partition("=")
            if name == "avg10":
                with contextlib.suppress(ValueError):
                    found[kind] = float(value)
    return found.get("some"), found.get("full")


def read_dirty(proc_root: Path = PROC) -> int | None:
    """Dirty + Writeback from /proc/meminfo, in bytes."""
    try:
        text = (proc_root / "meminfo").read_text()
    except OSError:
        return None
    total = 0
    seen = 0
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("Dirty", "Writeback"):
            parts = rest.split()
            if parts and parts[0].isdigit():
                total += int(parts[0]) * 1024
                seen += 1
    return total if seen else None


class IoSampler:
    """Samples the counters for the state dir's disks; ``own_bytes`` reports what the daemon wrote."""

    def __init__(self, state_dir: Path, own_bytes: Callable[[], int], clock: Callable[[], float]) -> None:
        self.disks = disks_under(state_dir)
        self.own_bytes = own_bytes
        self.clock = clock
        if not self.disks:
            log.warning("no block device found under %s: the throttle sees only PSI and dirty memory", state_dir)
        self._warned_missing = False

    def sample(self) -> IoSample:
        busy = nbytes = None
        if self.disks:
            try:
                counters = psutil.disk_io_counters(perdisk=True) or {}
            except (OSError, RuntimeError):
                counters = {}
            found = [counters[d] for d in self.disks if d in counters]
            if found:
                # Several disks (RAID, LVM across disks): the busiest one limits everyone.
                busy = float(max(getattr(c, "busy_time", 0) for c in found))
                nbytes = sum(c.read_bytes + c.write_bytes for c in found)
            elif not self._warned_missing:
                self._warned_missing = True
                log.warning("no I/O counters for %s: the throttle sees only PSI and dirty memory", self.disks)
        some, full = read_psi()
        return IoSample(at=self.clock(), busy_ms=busy, device_bytes=nbytes, own_bytes=self.own_bytes(),
                        psi_some=some, psi_full=full, dirty_bytes=read_dirty())
