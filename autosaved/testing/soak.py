"""Soak: SIGKILL the daemon at random instants while clients stream ``logged`` and ``committed``
updates and explicit saves, gc and deletes run; after every kill check every ack, offline (before the
restart, on exactly what the kill left) and through the restarted daemon.

Every update replaces all of its job's keys, so the state after update ``n`` does not depend on which
earlier unacknowledged updates the daemon got; a restore must then equal the state after some update
``m`` at least the newest acked one and at most the newest sent (see :func:`.crashsim.allowed_states`).
"""

from __future__ import annotations

import contextlib
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..client.admin import Admin
from ..client.sync import Client
from ..offline import restore
from .crashsim import History, allowed_states, canon
from .private import PrivateDaemon

# A known write speed: no 32 MiB probe at every (re)start, which would dominate a run of many restarts.
CONFIG = ('write_speed = "200MiB"\nchunk_size = "64KiB"\n'
          '[policy]\nidle = "0.3s"\ninterval = "off"\nmin_gap = "0s"\nkeep_last = 2\ncompression = "auto"\n')
STREAM_JOBS = ("s0", "s1")
DELETE_JOB = "sdel"


@dataclass
class SoakReport:
    kills: int = 0
    acks: dict[str, int] = field(default_factory=dict)
    acks_checked: int = 0
    acks_lost: int = 0
    checks: int = 0
    daemon_checks: int = 0
    saves_observed: int = 0
    wal_records_observed: int = 0
    gcs: int = 0
    deletes: int = 0
    unexpected_exits: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"kills {self.kills}, acks {sum(self.acks.values())} {dict(sorted(self.acks.items()))}, "
                f"acks checked {self.acks_checked}, acks lost {self.acks_lost}, checks {self.checks} offline + "
                f"{self.daemon_checks} through the daemon, saves {self.saves_observed} and log records "
                f"{self.wal_records_observed} observed (daemon status counters, just before each kill), "
                f"gc runs {self.gcs}, deletes {self.deletes}, unexpected daemon exits "
                f"{self.unexpected_exits}, problems {len(self.problems)}")


class Soak:
    def __init__(self, root: Path, seed: int = 0) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.daemon = PrivateDaemon(root, config=CONFIG, log_level="warning")
        self.history = History()
        self.marks: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.report = SoakReport()
        self.acks_since_check = 0
        self.saves_this_boot = 0
        self.wal_this_boot = 0

    # -- clients ---------------------------------------------------------------------------------

    def _client(self, job: str) -> Client:
        return Client(job, address=self.daemon.address, timeout=2, save_timeout=8, on_state_lost=lambda exc: None)

    def _state(self, job: str, n: int, rng: random.Random) -> dict[Any, Any]:
        # Every key every time, the same keys every time: see the module docstring. (With a key that
        # varied, an unacknowledged delete that did happen would leave a state the model cannot name.)
        return {"n": n, "arr": np.full(rng.choice([10, 30_000, 90_000]), n % 251, np.uint8), 7: ("int key", n),
                "t": (n, "x"), "w": np.arange(n % 50, dtype=np.float32)}

    def _ack(self, kind: str, **mark: Any) -> None:
        with self.lock:
            self.marks.append({"ev": "ack", **mark})
            self.report.acks[kind] = self.report.acks.get(kind, 0) + 1
            self.acks_since_check += 1

    def _stream(self, job: str, seed: int) -> None:
        rng = random.Random(seed)
        c = self._client(job)
        acked = 0
        while not self.stop.is_set():
            r = rng.random()
            try:
                if r < 0.85:
                    wait = "logged" if r < 0.6 else "committed"
                    with self.lock:
                        n = self.history.n.get(job, 0) + 1
                        delta = self._state(job, n, rng)
                        self.history.apply(job, delta)
                        self.marks.append({"ev": "sent", "what": "update", "job": job, "n": n})
                    c.update(delta, wait=wait)
                    self._ack(wait, what="update", job=job, n=n, level=wait)
                    acked = n
                elif r < 0.95:
                    # A save covers the updates the daemon is known to have: the newest acked one (a later
                    # update whose ack a kill swallowed may or may not be there).
                    n = acked
                    c.save()
                    self._ack("save", what="save", job=job, n=n, level="committed")
                else:
                    with Admin(address=self.daemon.address, timeout=c.timeout) as admin:
                        admin.gc(job)
                    with self.lock:
                        self.report.gcs += 1
            except Exception:
                # The daemon is down or restarting: nothing was acked. A fresh connection afterwards.
                with contextlib.suppress(Exception):
                    c.close()
                time.sleep(0.05)
                c = self._client(job)
        c.close()

    def _deleter(self, seed: int) -> None:
        rng = random.Random(seed)
        job = DELETE_JOB
        c = self._client(job)
        while not self.stop.is_set():
            try:
                if rng.random() < 0.8:
                    with self.lock:
                        n = self.history.n.get(job, 0) + 1
                        delta = self._state(job, n, rng)
                        self.history.apply(job, delta)
                        self.marks.append({"ev": "sent", "what": "update", "job": job, "n": n})
                    c.update(delta, wait="logged")
                    self._ack("logged", what="update", job=job, n=n, level="logged")
                else:
                    with self.lock:
                        n = self.history.n.get(job, 0)
                        self.marks.append({"ev": "sent", "what": "delete", "job": job, "n": n})
                    with Admin(address=self.daemon.address, timeout=c.timeout) as admin:
                        admin.delete(job)
                    with self.lock:
                        self.history.deleted(job)
                        self.report.deletes += 1
                    self._ack("delete", what="delete", job=job, n=n)
                    c.close()
                    c = self._client(job)
            except Exception:
                with contextlib.suppress(Exception):
                    c.close()
                time.sleep(0.05)
                c = self._client(job)
        c.close()

    # -- the kill loop ---------------------------------------------------------------------------

    def _observe_saves(self) -> None:
        c = Admin(address=self.daemon.address, timeout=1)
        try:
            status = c.status()
            self.saves_this_boot = max(self.saves_this_boot, int(status["daemon"]["saves"]))
            self.wal_this_boot = max(self.wal_this_boot, int(status["daemon"]["wal_records"]))
        except Exception:
            pass
        finally:
            c.close()

    def _check(self, via_daemon: bool) -> None:
        with self.lock:
            marks = list(self.marks)
            checked = self.acks_since_check
            self.acks_since_check = 0
        for job in (*STREAM_JOBS, DELETE_JOB):
            allowed, none_ok, floor = allowed_states(self.history, job, marks)
            try:
                if via_daemon:
                    c = Client(job, address=self.daemon.address, timeout=30, save_timeout=60)
                    try:
                        c.connect()
                        got = c.restore()
                    finally:
                        c.close()
                else:
                    got = restore(job, state_dir=self.daemon.state_dir)
            except Exception as exc:
                # A job deleted between the marks snapshot and the read is NotFound: only when allowed.
                if none_ok and "not_found" in repr(exc).lower() + str(getattr(exc, "code", "")):
                    continue
                self.report.problems.append(f"kill {self.report.kills}: {job}: restore raised {exc!r}")
                continue
            where = "daemon" if via_daemon else "offline"
            if via_daemon:
                # The clients kept sending while the daemon was read: any state sent by now may be served.
                with self.lock:
                    sent = max((int(m["n"]) for m in self.marks
                                if m.get("job") == job and m["ev"] == "sent" and m["what"] == "update"), default=0)
                    states = self.history.states.get(job, {})
                    allowed |= {states[m] for m in range(max(floor, 1), sent + 1) if m in states}
                    none_ok = none_ok or any(m.get("job") == job and m["what"] == "delete" for m in self.marks)
            if got is None:
                if not none_ok:
                    self.report.acks_lost += 1
                    self.report.problems.append(f"kill {self.report.kills} ({where}): {job} gone; update {floor} "
                                                "was acked")
                continue
            if canon(got) not in allowed:
                n = got.get("n") if isinstance(got, dict) else None
                if isinstance(n, int) and n < floor:
                    self.report.acks_lost += 1
                self.report.problems.append(f"kill {self.report.kills} ({where}): {job} restored n={n!r}, acked "
                                            f"floor {floor}")
        if not via_daemon:
            self.report.acks_checked += checked
            self.report.checks += 1
        else:
            self.report.daemon_checks += 1

    def run(self, kills: int, *, max_gap: float = 0.6, daemon_check_every: int = 1,
            on_progress: Callable[[SoakReport], None] | None = None) -> SoakReport:
        d = self.daemon
        d.start(timeout=60)
        seeds = [self.rng.randrange(2**32) for _ in range(3)]
        threads = [threading.Thread(target=self._stream, args=(job, s), daemon=True)
                   for job, s in zip(STREAM_JOBS, seeds, strict=False)]
        threads.append(threading.Thread(target=self._deleter, args=(seeds[2],), daemon=True))
        for t in threads:
            t.start()
        try:
            for k in range(kills):
                time.sleep(self.rng.uniform(0.02, max_gap))
                self._observe_saves()
                assert d.proc is not None
                if d.proc.poll() is not None:
                    self.report.unexpected_exits += 1
                    self.report.problems.append(f"daemon exited by itself with {d.proc.returncode} before kill {k}")
                else:
                    d.proc.send_signal(signal.SIGKILL)
                d.proc.wait()
                self.report.kills += 1
                self.report.saves_observed += self.saves_this_boot
                self.report.wal_records_observed += self.wal_this_boot
                self.saves_this_boot = self.wal_this_boot = 0
                self._check(via_daemon=False)  # exactly what the kill left, before anything touches it
                d.start(timeout=60)
                if k % daemon_check_every == 0:
                    self._check(via_daemon=True)
                if on_progress is not None:
                    on_progress(self.report)
        finally:
            self.stop.set()
            for t in threads:
                t.join(30)
            d.cleanup()
        return self.report
