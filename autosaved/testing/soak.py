"""Soak: SIGKILL the daemon at random instants while clients stream ``accepted``, ``logged`` and
``committed`` updates (full states and deep merges) and explicit saves, gc and deletes run; after every
kill check every ack, offline (before the restart, on exactly what the kill left) and through the
restarted daemon. With a SeaweedFS server (``remote=``) the daemon replicates to it, some updates wait
for ``replicated``, the bucket is stopped (SIGSTOP) and resumed at random, and after every kill the
bucket's newest version is checked against the ``replicated`` acks.

The daemon keeps a prefix of each client's updates (a ``logged`` record carries every delta accepted
before it), so a restore must equal the state after some update ``m``, at least the newest acked one at a
durable level and at most the newest sent (see :func:`.crashsim.allowed_states`). A deep merge changes only
some leaves, so after a kill (when the daemon may have lost an update the model applied) a client's next
update is a full one, which sets every leaf: deep merges then go on from a state the model names.
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
from typing import TYPE_CHECKING, Any

import numpy as np

from ..client.admin import Admin
from ..client.sync import Client
from ..offline import restore
from .crashsim import History, allowed_states, canon
from .private import PrivateDaemon

if TYPE_CHECKING:
    from ..seaweed import SeaweedServer

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
    bucket_pauses: int = 0
    bucket_checks: int = 0
    unexpected_exits: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"kills {self.kills}, acks {sum(self.acks.values())} {dict(sorted(self.acks.items()))}, "
                f"acks checked {self.acks_checked}, acks lost {self.acks_lost}, checks {self.checks} offline + "
                f"{self.daemon_checks} through the daemon, saves {self.saves_observed} and log records "
                f"{self.wal_records_observed} observed (daemon status counters, just before each kill), "
                f"gc runs {self.gcs}, deletes {self.deletes}, bucket stops {self.bucket_pauses} and checks "
                f"{self.bucket_checks}, unexpected daemon exits {self.unexpected_exits}, problems "
                f"{len(self.problems)}")


class Soak:
    def __init__(self, root: Path, seed: int = 0, remote: SeaweedServer | None = None,
                 log_level: str = "warning") -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.remote = remote
        config, env = CONFIG, None
        if remote is not None:
            self.prefix = f"soak-{seed}-{self.rng.randrange(1 << 30):x}"
            config += (f'[remote]\nurl = "{remote.url(self.prefix)}"\nendpoint = "{remote.endpoint}"\n'
                       'timeout = "2s"\nlease_ttl = "30s"\n')
            env = remote.env
        self.daemon = PrivateDaemon(root, config=config, log_level=log_level, env=env)
        # Held while the bucket is stopped: a bucket check waits for it to run again.
        self.bucket_lock = threading.Lock()
        self.history = History()
        self.marks: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.report = SoakReport()
        self._raw: dict[tuple[str, int], Any] = {}  # (job, n) -> the model's state (for problem reports)
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

    def _partial(self, n: int, rng: random.Random) -> dict[Any, Any]:
        """A deep merge: one or two nested leaves (every key it names exists since the job's first full
        update, which sets them all)."""
        return rng.choice([{"deep": {"a": {"x": n}}}, {"deep": {"b": n}}, {"n": n, "deep": {"a": {"y": n}}}])

    def _stream(self, job: str, seed: int) -> None:
        rng = random.Random(seed)
        # StateLost (accepted deltas gone with a kill) is raised, not absorbed: the next update is full.
        c = Client(job, address=self.daemon.address, timeout=2, save_timeout=8)
        durable = 0  # the newest update acked at a level that survives a kill
        full_next = True
        while not self.stop.is_set():
            r = rng.random()
            try:
                if r < 0.85:
                    wait = "accepted" if r < 0.2 else "logged" if r < 0.55 else "committed"
                    if wait == "committed" and self.remote is not None and rng.random() < 0.5:
                        wait = "replicated"
                    with self.lock:
                        n = self.history.n.get(job, 0) + 1
                        if full_next:
                            delta = {**self._state(job, n, rng), "deep": {"a": {"x": n, "y": n}, "b": n}}
                        else:
                            delta = self._partial(n, rng)
                        self.history.apply(job, delta)
                        self._raw[(job, n)] = self.history.current[job]
                        self.marks.append({"ev": "sent", "what": "update", "job": job, "n": n})
                    c.update(delta, wait=wait)
                    full_next = False
                    level = "committed" if wait == "replicated" else wait
                    self._ack(wait, what="update", job=job, n=n, level=level)
                    if wait == "replicated":  # the bucket's floor (counted once, above)
                        with self.lock:
                            self.marks.append({"ev": "ack", "what": "replicated", "job": job, "n": n})
                    if wait != "accepted":
                        durable = n
                elif r < 0.95:
                    # A save covers the updates the daemon is known to have kept: the newest acked at a
                    # durable level (a later one whose ack a kill swallowed, or an accepted one a kill
                    # took, may or may not be there).
                    n = durable
                    c.save()
                    self._ack("save", what="save", job=job, n=n, level="committed")
                else:
                    with Admin(address=self.daemon.address, timeout=c.timeout, save_timeout=10) as admin:
                        admin.gc(job)
                    with self.lock:
                        self.report.gcs += 1
            except Exception:
                # The daemon is down or restarting, or lost accepted deltas: nothing was acked. A fresh
                # connection afterwards, and a full update first.
                full_next = True
                with contextlib.suppress(Exception):
                    c.close()
                time.sleep(0.05)
                c = Client(job, address=self.daemon.address, timeout=2, save_timeout=8)
        c.close()

    def _blink(self, seed: int) -> None:
        """Stop (SIGSTOP) and resume the bucket at random: requests to it hang, then time out."""
        assert self.remote is not None
        rng = random.Random(seed)
        while not self.stop.wait(rng.uniform(0.5, 2.0)):
            with self.bucket_lock:
                self.remote.pause()
                self.report.bucket_pauses += 1
                try:
                    self.stop.wait(rng.uniform(0.3, 2.5))
                finally:
                    self.remote.resume()

    def _nearest(self, job: str, got: Any, floor: int) -> str:
        """For a problem report: the model state nearest to ``got`` (fewest differing top-level and "deep"
        leaves) from a few before the floor on, and how they differ."""
        def leaves(state: Any) -> dict[str, Any]:
            flat = {repr(k): canon(v) for k, v in state.items() if k != "deep"} if isinstance(state, dict) else {}
            deep = state.get("deep", {}) if isinstance(state, dict) else {}
            flat.update({f"deep.a.{k}": v for k, v in (deep.get("a") or {}).items()})
            flat["deep.b"] = deep.get("b")
            return flat

        with self.lock:
            current = dict(self.history.states.get(job, {}))
            raw = {m: self._raw.get((job, m)) for m in current}
        mine = leaves(got)
        best = None
        for m in range(max(1, floor - 5), max(current, default=0) + 1):
            theirs = raw.get(m)
            if theirs is None:
                continue
            diff = sorted(k for k in set(mine) | set(leaves(theirs)) if mine.get(k) != leaves(theirs).get(k))
            if best is None or len(diff) < len(best[1]):
                best = (m, diff)
        if best is None:
            return "no model state to compare"
        m, diff = best
        def short(v: Any) -> str:
            if isinstance(v, tuple) and v and v[0] == "nd":  # an array: its shape and first byte
                return f"array{v[2]} of {v[3][:1]!r}"
            return repr(v)[:60]

        theirs = leaves(raw[m])
        return (f"nearest model state {m}, differing in "
                f"{[(k, short(mine.get(k)), short(theirs.get(k))) for k in diff][:4]} (restored, model)")

    def _check_bucket(self) -> None:
        """The bucket's newest version is at least the newest ``replicated`` ack of each stream job."""
        assert self.remote is not None
        import os

        from ..codec import unpack
        from ..remote_offline import run_sync
        from ..seaweed import ACCESS_KEY, SECRET_KEY
        from ..storage.remote import RemoteStore

        store = RemoteStore(self.remote.url(self.prefix), endpoint=self.remote.endpoint, region="us-east-1",
                            credentials={"access_key_id": ACCESS_KEY, "secret_access_key": SECRET_KEY})
        with self.lock:
            marks = list(self.marks)
        for job in STREAM_JOBS:
            floor = max((int(m["n"]) for m in marks if m.get("job") == job and m["what"] == "replicated"
                         and m["ev"] == "ack"), default=0)
            if floor == 0:
                continue
            sent = max(int(m["n"]) for m in marks if m.get("job") == job and m["ev"] == "sent")
            skipped: list[str] = []
            with self.bucket_lock:  # the bucket runs while it is read
                rjob = store.job(os.geteuid(), job)
                loaded = run_sync(lambda rjob=rjob, out=skipped: rjob.load_version(None, out.append))  # type: ignore[misc]
                visible = run_sync(rjob.visible_versions)
            got = None if loaded is None else unpack(loaded.tree)
            states = self.history.states.get(job, {})
            if got is None or canon(got) not in {states[m] for m in range(floor, sent + 1) if m in states}:
                n = got.get("n") if isinstance(got, dict) else None
                self.report.acks_lost += 1
                shown = [(vk.id, vk.epoch) for vk in visible[-6:]]
                self.report.problems.append(f"kill {self.report.kills} (bucket): {job} newest n={n!r}, "
                                            f"replicated ack {floor}; newest (id, epoch) {shown}; skipped {skipped}; "
                                            f"{self._nearest(job, got, floor)}")
        self.report.bucket_checks += 1

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
                    with Admin(address=self.daemon.address, timeout=c.timeout, save_timeout=10) as admin:
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
                                            f"floor {floor}; {self._nearest(job, got, floor)}")
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
        if self.remote is not None:
            threads.append(threading.Thread(target=self._blink, args=(seeds[0] ^ seeds[1],), daemon=True))
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
                if self.remote is not None:
                    self._check_bucket()
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
