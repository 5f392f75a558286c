"""``autosaved top``: a live view of every job you may see, refreshed every second (``rich``).

One frame is a pure function of a ``status`` reply and the time (:func:`frame`), so it is tested without a
terminal; :func:`run` is the I/O edge: it polls the daemon, redraws, and reads single keys (the terminal in
cbreak mode) to sort or quit. ``--once`` prints one frame and exits, for scripts and bug reports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..errors import DaemonUnavailable
from .common import add_client_options, admin, human_bytes

# key → (column title, sort key of a job row, newest/largest first?)
SORTS: dict[str, tuple[str, Callable[[dict[str, Any]], Any], bool]] = {
    "j": ("JOB", lambda j: (j["job"], j["owner"]), False),
    "o": ("OWNER", lambda j: (j["owner"], j["job"]), False),
    "d": ("DIRTY", lambda j: j.get("dirty_bytes") or 0, True),
    "a": ("LAST SAVE", lambda j: j.get("last_save_time") or "", True),
    "t": ("TOOK", lambda j: j.get("last_save_duration_s") or 0.0, True),
    "l": ("LOG", lambda j: j.get("wal_lsn") or 0, True),
    "u": ("UPLOAD", lambda j: ((j.get("remote") or {}).get("backlog_bytes") or 0), True),
    "e": ("ERROR", lambda j: bool(j.get("last_error") or j.get("wal_error")), True),
}
HELP = "sort: j job  o owner  d dirty  a last save  t took  l log  u upload  e errors   r reverse   q quit"


def add_parser(sub: Any, name: str) -> None:
    p: argparse.ArgumentParser = sub.add_parser(name, help="live view of the daemon's jobs (q quits)")
    add_client_options(p)
    p.add_argument("--once", action="store_true", help="print one frame and exit")
    p.add_argument("--sort", choices=sorted(SORTS), default="j", help="initial sort key (default j: job name)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")


def _age(iso: str | None, now: float) -> str:
    if not iso:
        return "never"
    try:
        seconds = now - datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return iso
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _saving(j: dict[str, Any]) -> str:
    if not j.get("saving"):
        return ""
    written = j.get("save_written")
    rate = j.get("save_rate")
    if written is None or rate is None:
        return "queued"
    return f"{human_bytes(written)} @ {human_bytes(rate)}/s"


def _upload(j: dict[str, Any]) -> tuple[str, str]:
    r = j.get("remote")
    if not r:
        return "-", "-"
    backlog = f"{r.get('backlog_versions', 0)} v, {human_bytes(r.get('backlog_bytes', 0))}"
    return backlog, str(r.get("replicated_version") or "-")


def frame(status: dict[str, Any], now: float, sort: str = "j", reverse: bool = False) -> Group:
    """One screen: the daemon's line, the job table sorted by ``sort``, the keys."""
    d = status["daemon"]
    title, key, largest_first = SORTS[sort]
    jobs = sorted(status["jobs"], key=key, reverse=largest_first != reverse)
    throttle = d.get("throttle") or {}
    rate = throttle.get("allowed_rate")
    head = Text.assemble(
        (f"autosaved {d['version']}", "bold"), f"  pid {d['pid']}  up {d['uptime_s']:.0f}s  ",
        f"{len(jobs)} jobs  saves {d['saves']} ({human_bytes(d['bytes_written'])})  failures {d['save_failures']}  ",
        f"write rate {'unlimited' if rate is None else human_bytes(rate) + '/s'}  ",
        (f"at {time.strftime('%H:%M:%S', time.localtime(now))}", "dim"),
    )
    table = Table(expand=False, box=None, header_style="bold", pad_edge=False)
    for col in ("JOB", "OWNER", "DIRTY", "LAST SAVE", "REASON", "TOOK", "SAVING", "LOG", "UPLOAD", "REPLICATED",
                "ERROR"):
        marker = (" v" if largest_first != reverse else " ^") if col == title else ""
        table.add_column(col + marker, no_wrap=True, overflow="ellipsis",
                         justify="right" if col in ("OWNER", "DIRTY", "TOOK", "LOG", "REPLICATED") else "left")
    for j in jobs:
        backlog, replicated = _upload(j)
        took = j.get("last_save_duration_s")
        error = j.get("last_error") or j.get("wal_error") or ""
        table.add_row(
            j["job"], str(j["owner"]), human_bytes(j.get("dirty_bytes") or 0) if j.get("dirty") else "0",
            _age(j.get("last_save_time"), now), j.get("last_save_reason") or "-",
            "-" if took is None else f"{took:.2f}s", _saving(j), str(j.get("wal_lsn") or 0), backlog, replicated,
            Text(error, style="red") if error else "",
        )
    if not jobs:
        table.add_row("(no jobs yet)", *[""] * 10)
    return Group(head, Text(""), table, Text(""), Text(HELP, style="dim"))


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str | None]]:
    """Single key presses from stdin (cbreak mode, restored on exit); a reader that waits up to a timeout."""
    if not sys.stdin.isatty():
        def wait(timeout: float) -> str | None:
            time.sleep(timeout)
            return None

        yield wait
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        def read(timeout: float) -> str | None:
            ready, _, _ = select.select([fd], [], [], timeout)
            return os.read(fd, 1).decode(errors="replace") if ready else None

        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(args: argparse.Namespace) -> int:
    console = Console()
    sort, reverse = args.sort, False
    if args.once:
        with admin(args) as client:
            console.print(frame(client.status(), time.time(), sort))
        return 0
    with admin(args) as client, _keys() as read, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            try:
                live.update(frame(client.status(), time.time(), sort, reverse), refresh=True)
            except DaemonUnavailable as exc:
                live.update(Text(f"autosaved top: {exc} (retrying; q quits)", style="red"), refresh=True)
            deadline = time.monotonic() + args.interval
            while (left := deadline - time.monotonic()) > 0:
                key = read(left)
                if key in ("q", "Q", "\x03"):
                    return 0
                if key in SORTS:
                    sort, reverse = key, False
                    break
                if key == "r":
                    reverse = not reverse
                    break
