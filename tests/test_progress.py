"""Progress lines (issue 22): redrawn lines leave no characters behind, show rate and ETA, go to stderr
only on a terminal (or with ``--progress``), and a long benchmark says what it is doing."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np

import autosaved
from autosaved.fmt import Progress, progress_line
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY


def screen(written: str) -> str:
    """What a terminal shows on the last line after ``written``: ``\\r`` returns to column 0 and later
    characters overwrite earlier ones; nothing is erased."""
    line: list[str] = []
    col = 0
    for ch in written.split("\n")[-1] if not written.endswith("\n") else written.rstrip("\n").split("\n")[-1]:
        if ch == "\r":
            col = 0
            continue
        if col < len(line):
            line[col] = ch
        else:
            line.append(ch)
        col += 1
    return "".join(line)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_cover_the_previous_one_and_show_rate_and_eta() -> None:
    out, clock = io.StringIO(), FakeClock()
    p = Progress("writing out", force=True, total=2 << 30, stream=out, clock=clock)
    # A fast start then a slow tail: the rate and ETA texts shrink and grow between redraws.
    for seconds, nbytes in ((0.5, 900 << 20), (1.0, 100 << 20), (60.0, 24 << 20), (0.2, 1 << 30)):
        clock.now += seconds
        p(nbytes)
        shown = screen(out.getvalue()).rstrip()
        assert shown == progress_line("writing out", p.done, p.total, clock.now - 100.0), shown
    p.finish()
    assert out.getvalue().endswith("\n")
    final = screen(out.getvalue()).rstrip()
    assert final.startswith("writing out 100% 2.0 GiB/2.0 GiB ") and final.endswith("/s") and "GiBB" not in final


def test_progress_line_has_rate_and_eta() -> None:
    assert progress_line("x", 1 << 30, 2 << 30, 4.0) == "x 50% 1.0 GiB/2.0 GiB 256.0 MiB/s ETA 4s"
    assert progress_line("x", 1 << 20, 0, 2.0) == "x 1.0 MiB 512.0 KiB/s"
    assert progress_line("x", 1 << 20, 10 << 20, 60.0).endswith("ETA 9m00s")


def test_progress_is_silent_off_a_terminal() -> None:
    out = io.StringIO()
    p = Progress("writing", total=10, stream=out)
    p(10)
    p.finish()
    assert out.getvalue() == ""


def test_restore_progress_only_on_a_terminal_or_when_asked(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("p", address=d.address) as c:
        c.update({"w": np.frombuffer(os.urandom(3 << 20), dtype=np.uint8)}, wait="committed")
    env = {**os.environ, "AUTOSAVED_ADDRESS": d.address}
    quiet = subprocess.run([sys.executable, "-m", "autosaved", "restore", "p", "--out", str(d.root / "a")],
                           capture_output=True, text=True, env=env, timeout=120)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = subprocess.run([sys.executable, "-m", "autosaved", "restore", "p", "--out", str(d.root / "b"),
                           "--progress"], capture_output=True, text=True, env=env, timeout=120)
    assert loud.returncode == 0 and loud.stdout.startswith("p: ")
    shown = screen(loud.stderr).rstrip()
    assert shown.startswith(f"writing {d.root / 'b'} 100% 3.0 MiB/3.0 MiB") and shown.endswith("/s"), loud.stderr


def test_a_long_bench_says_what_it_is_doing_on_a_terminal() -> None:
    main, sub = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "autosaved", "bench", "--size", "8MiB"], stdin=sub,
                                stdout=subprocess.PIPE, stderr=sub, text=True)
        os.close(sub)
        out, _ = proc.communicate(timeout=300)
        seen = b""
        try:
            while chunk := os.read(main, 65536):
                seen += chunk
        except OSError:  # EIO: the terminal's last writer is gone
            pass
    finally:
        os.close(main)
    assert proc.returncode == 0, seen
    text = seen.decode()
    for stage in ("autosaved bench data: memcpy", "round 1/3: save", "round 3/3: restore"):
        assert stage in text, text
    assert screen(text).strip() == "", "the status line is erased before the table"
    assert out.startswith("autosaved bench:") and "\r" not in out
