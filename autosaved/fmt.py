"""Output helpers the CLI and the benchmarks share (JSON, sizes, tables, progress and status lines). A leaf:
it imports nothing of autosaved, so the benchmarks use it without importing the CLI (which imports the
benchmarks)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _duration(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def progress_line(label: str, done: int, total: int, elapsed: float) -> str:
    """``label 42% 1.2 GiB/2.9 GiB 310.0 MiB/s ETA 6s``: a pure function of the counts and the time."""
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [label]
    if total:
        parts.append(f"{100 * done // total}% {human_bytes(done)}/{human_bytes(total)}")
    else:
        parts.append(human_bytes(done))
    if rate > 0:
        parts.append(f"{human_bytes(int(rate))}/s")
        if total and done < total:
            parts.append(f"ETA {_duration((total - done) / rate)}")
    return " ".join(parts)


class StatusLine:
    """One line on stderr that each ``show`` redraws in place, wholly covering the previous text; silent
    unless the stream is a terminal (or ``force``). ``clear`` erases it, so what follows starts clean."""

    def __init__(self, *, force: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = force or self.stream.isatty()
        self._width = 0

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        # Spaces over what a longer previous line left: works on a terminal and in a captured log alike.
        self.stream.write("\r" + text + " " * max(0, self._width - len(text)))
        self.stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0


class Stages:
    """What a long benchmark is doing (``autosaved bench: round 2/3: save (41s)``), on a status line."""

    def __init__(self, name: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.line = StatusLine()
        self.clock = clock
        self._started = clock()

    def __call__(self, what: str) -> None:
        self.line.show(f"autosaved bench {self.name}: {what} ({_duration(self.clock() - self._started)})")

    def done(self) -> None:
        self.line.clear()


class Progress:
    """A byte counter with rate and ETA on stderr (``label 42% 1.2 GiB/2.9 GiB 310.0 MiB/s ETA 6s``),
    redrawn at most 10 times a second over the previous line, which it fully covers (issue 22: a shorter
    line left characters behind, ``1.0 GiB/1.0 GiBB``). Silent unless stderr is a terminal or ``force`` is
    set, so scripts and logs stay clean. Call it with the number of bytes about to be written (it is a
    storage ``Pacer``)."""

    def __init__(self, label: str, *, force: bool = False, total: int = 0, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.line = StatusLine(force=force, stream=stream)
        self.enabled = self.line.enabled
        self.clock = clock
        self._started = clock()
        self._drawn = 0.0

    def __call__(self, nbytes: int) -> None:
        self.done += nbytes
        now = self.clock()
        if self.enabled and (now - self._drawn >= 0.1 or self.done >= self.total):
            self._drawn = now
            self._draw(progress_line(self.label, self.done, self.total, now - self._started))

    def _draw(self, text: str) -> None:
        self.line.show(text)

    def finish(self) -> None:
        if self.enabled and self._drawn:
            self._draw(progress_line(self.label, self.done, self.total, self.clock() - self._started))
            self.line.stream.write("\n")
            self.line.stream.flush()
