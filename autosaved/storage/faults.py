"""Fault injection at the storage layer's syscall boundary, for the crash and error tests.

Production never sets ``AUTOSAVED_FAULTS_FILE``, and then every ``point()`` call is one dictionary
lookup. With it set, the file (re-read whenever it changes, so a test can add and clear faults while
the daemon runs) holds one rule per line::

    <kind>.<op>.<phase> <n> <action>[+]

``kind`` is ``chunk``, ``manifest``, ``wal`` or ``*``; ``op`` is ``open``, ``write``, ``fsync``,
``rename`` or ``fsync_dir``; ``phase`` is ``before`` or ``after``. Besides these, ``gc.collect.before``
(a collection about to list what manifests reference) and ``task.<name>.<start|before>`` (a daemon task
starting, or about to do one piece of work). The rule fires on the ``n``-th
matching call (counted from when the rule appeared), and on every later one with a trailing ``+``.
Actions: ``crash`` (SIGKILL this process: a power cut at exactly that instant, as far as this process
is concerned), ``enospc``, ``eio``, ``erofs`` (raise that OSError), ``raise`` (a RuntimeError: a bug, for
the supervision tests, whose ``task`` kind names a daemon task), ``sleep<seconds>`` (stall here, e.g.
``sleep2.5``: widens a race window so a test can hit it every time).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass

_ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "erofs": errno.EROFS}


@dataclass
class _Rule:
    kind: str
    op: str
    phase: str
    nth: int
    action: str
    persistent: bool
    seen: int = 0


class _Faults:
    def __init__(self) -> None:
        self.path = os.environ.get("AUTOSAVED_FAULTS_FILE")
        self.stamp: tuple[float, int] | None = None
        self.rules: list[_Rule] = []

    def _reload(self) -> None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.rules, self.stamp = [], None
            return
        stamp = (st.st_mtime, st.st_size)
        if stamp == self.stamp:
            return
        self.stamp = stamp
        rules = []
        with open(self.path) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) != 3 or line.startswith("#"):
                    continue
                where, nth, action = parts
                kind, op, phase = where.split(".")
                rules.append(_Rule(kind, op, phase, int(nth), action.rstrip("+"), action.endswith("+")))
        self.rules = rules

    def point(self, kind: str, op: str, phase: str, detail: object = "") -> None:
        if self.path is None:
            return
        self._reload()
        for rule in self.rules:
            if rule.kind in ("*", kind) and rule.op == op and rule.phase == phase:
                rule.seen += 1
                if rule.seen == rule.nth or (rule.persistent and rule.seen > rule.nth):
                    self._fire(rule, f"{kind}.{op}.{phase} {detail}")

    @staticmethod
    def _fire(rule: _Rule, where: str) -> None:
        if rule.action == "crash":
            os.kill(os.getpid(), signal.SIGKILL)
        if rule.action == "raise":
            raise RuntimeError(f"injected failure at {where}")
        if rule.action.startswith("sleep"):
            time.sleep(float(rule.action.removeprefix("sleep")))
            return
        code = _ERRORS[rule.action]
        raise OSError(code, f"{os.strerror(code)} (injected at {where})")


_faults = _Faults()


def point(kind: str, op: str, phase: str, detail: object = "") -> None:
    """A place where a test may inject a crash or an I/O error."""
    _faults.point(kind, op, phase, detail)
