"""Fault injection at the storage layer's syscall boundary, for the crash and error tests.

Production never sets ``AUTOSAVED_FAULTS_FILE``, and then every ``point()`` call is one dictionary
lookup. With it set, the file (re-read whenever it changes, so a test can add and clear faults while
the daemon runs) holds one rule per line::

    <kind>.<op>.<phase> <n> <action>[+]

Every instrumented point is listed in :data:`POINTS`. The rule fires on the ``n``-th matching call
(counted from when the rule appeared), and on every later one with a trailing ``+``. ``kind`` may be
``*``. Actions: ``crash`` (SIGKILL this process, through the seam's :func:`.fileops.crash`, which a
recorder makes wait until no operation is half recorded: a power cut at exactly that instant, as far as
this process is concerned), ``enospc``, ``eio``, ``erofs`` (raise that OSError), ``raise`` (a RuntimeError:
a bug, for the supervision tests), ``sleep:<seconds>`` (block the calling thread: on the event loop's own
points, a hung loop; in a worker, a widened race window). ``<kind>.write.middle`` is inside a
write (:func:`autosaved.storage.fileops.write`): half of the buffer has reached the kernel when it fires,
so ``crash`` there leaves a real torn tail and an error a real partial file; after a non-fatal action
the write goes on with the other half.

With faults on, every point reached is also recorded, once per name, in ``<file>.seen``: the tests
check that the crash scenario reaches every storage point in :data:`POINTS`, and nothing else. A rule
about to act is recorded in ``<file>.fired`` (its point's name, once per firing, before the action): a
test waits on that to know the n-th hit it asked for, not just the first, was reached.
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from dataclasses import dataclass

_ERRORS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "erofs": errno.EROFS}

_FILE_STEPS = ("open.before", "write.before", "write.middle", "write.after", "fsync.before", "fsync.after",
               "rename.before", "rename.after", "fsync_dir.before", "fsync_dir.after")
# Every point the code calls, by the path that reaches it. A new call site must be added here (the tests
# fail on a point reached that is not listed, and on a listed point no test fires).
POINTS: dict[str, str] = {
    **{f"chunk.{s}": "a save writes a chunk file (write_fsync, rename, fsync of objects/<ab>/)" for s in _FILE_STEPS},
    **{f"page.{s}": "a format-2 save writes a page of its state tree (the chunk pipeline)"
       for s in _FILE_STEPS if not s.startswith("fsync_dir")},
    "chunk.delete.before": "garbage collection deletes an unreferenced chunk",
    "chunk.delete.after": "garbage collection deleted an unreferenced chunk",
    **{f"manifest.{s}": "a save commits its manifest (atomic_write)" for s in _FILE_STEPS},
    "dir.fsync_dir.before": "make_dirs makes a new directory durable (a job's first save, a new log dir)",
    "dir.fsync_dir.after": "make_dirs made a new directory durable",
    "version.delete.before": "retention deletes an old version's manifest",
    "version.delete.after": "retention deleted an old version's manifest",
    "version.fsync_dir.before": "retention makes the manifest deletions durable",
    "version.fsync_dir.after": "retention made the manifest deletions durable",
    "wal.open.before": "the log opens a new segment",
    "wal.fsync_dir.before": "the log makes a new segment's name (or deleted segments) durable",
    "wal.fsync_dir.after": "the log made a new segment's name (or deleted segments) durable",
    "wal.write.before": "the log writes a record's bytes",
    "wal.write.middle": "half of a log write reached the kernel (a crash here is a real torn tail)",
    "wal.fsync.before": "the log fdatasyncs a group of records",
    "wal.fsync.after": "the log fdatasynced a group of records",
    "wal.delete.before": "a log segment covered by a committed version is deleted",
    "wal.delete.after": "a log segment covered by a committed version was deleted",
    "loop.tick.before": "the rpc loop goes round, on the event loop itself (sleep: a hung event loop)",
    "rpc.poll.before": "the rpc loop goes round, in a worker thread (sleep: an rpc loop that stalls while "
                       "the event loop runs)",
    "offload.decode.before": "a big request is about to be decoded or planned in a worker thread "
                             "(sleep: a long decode, while the rest of the daemon serves)",
    "load.job.before": "a job is about to be loaded from disk, in a worker thread (sleep: a long replay)",
    "gc.collect.before": "a garbage collection is about to list what the manifests reference",
    "restore.read.before": "a restore is about to read a stored leaf's chunks, in a worker thread (sleep: a "
                           "slow read that a save and its retention could overtake)",
    "delete.lock.before": "a delete, holding the job's key lock, is about to wait for its save or gc (io lock)",
    "remote.manifest.before": "an upload sent every chunk of a version and is about to publish its manifest "
                              "(sleep, in a worker thread: an upload held half-done)",
    **{f"task.{t}.start": "a supervised daemon task starts (raise: a bug at its start)"
       for t in ("rpc", "scheduler", "signals", "reloader", "watchdog", "iocontrol", "metrics", "preemption",
                 "probe", "attach", "uploadrate", "replica", "remotedelete", "walflush", "collector")},
    **{f"task.{t}.before": "a daemon task is about to do one piece of work (raise: a bug in that piece)"
       for t in ("rpc", "scheduler", "writer", "logger", "fd", "metrics", "main")},
}


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
        self.path = os.environ.get("AUTOSAVED_FAULTS_FILE") or None  # set but empty: off, as unset
        self.stamp: tuple[float, int] | None = None
        self.rules: list[_Rule] = []
        self.seen: set[str] = set()
        # Points are reached from several threads at once (the chunk pipeline's syncer, the concurrent
        # directory fsyncs): hit counts and reloads must not race.
        self.lock = threading.Lock()

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

    def _due(self, kind: str, op: str, phase: str) -> _Rule | None:
        """Count this hit against every matching rule; the rule that fires now, if any."""
        if self.path is None:
            return None
        with self.lock:
            self._reload()
            name = f"{kind}.{op}.{phase}"
            if name not in self.seen:
                self.seen.add(name)
                with open(self.path + ".seen", "a") as fh:
                    fh.write(name + "\n")
            due = None
            for rule in self.rules:
                if rule.kind in ("*", kind) and rule.op == op and rule.phase == phase:
                    rule.seen += 1
                    if rule.seen == rule.nth or (rule.persistent and rule.seen > rule.nth):
                        due = due or rule
            if due is not None:
                with open(self.path + ".fired", "a") as fh:
                    fh.write(name + "\n")
            return due

    def point(self, kind: str, op: str, phase: str, detail: object = "") -> None:
        rule = self._due(kind, op, phase)
        if rule is not None:
            self._fire(rule, f"{kind}.{op}.{phase} {detail}")

    @staticmethod
    def _fire(rule: _Rule, where: str) -> None:
        if rule.action == "crash":
            from . import fileops  # which imports this module

            fileops.crash()
            os.kill(os.getpid(), signal.SIGKILL)  # not reached: a plug-in's crash must kill too
        if rule.action == "raise":
            raise RuntimeError(f"injected failure at {where}")
        if rule.action.startswith("sleep"):
            time.sleep(float(rule.action.removeprefix("sleep").removeprefix(":")))
            return
        code = _ERRORS[rule.action]
        raise OSError(code, f"{os.strerror(code)} (injected at {where})")


_faults = _Faults()


def point(kind: str, op: str, phase: str, detail: object = "") -> None:
    """A place where a test may inject a crash or an I/O error."""
    _faults.point(kind, op, phase, detail)


def due(kind: str, op: str, phase: str) -> _Rule | None:
    """Count a hit of the point; the rule that fires now, if any (for a point inside an operation: the
    caller does its part, then :func:`fire`). :mod:`.fileops` uses it for ``<kind>.write.middle``."""
    return _faults._due(kind, op, phase)


def fire(rule: _Rule, where: str) -> None:
    """Carry out ``rule``'s action (see :func:`due`)."""
    _faults._fire(rule, where)


def active() -> bool:
    """Whether fault injection is on (a test run); production never pays for the points below it."""
    return _faults.path is not None
