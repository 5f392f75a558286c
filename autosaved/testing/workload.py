"""The workload the power-loss checker records: a real daemon (subprocess, real socket, real files)
driven through every storage path — saves (raw and compressed chunks, dedup), ``logged`` appends and log
rotation, ``accepted`` updates carried by the next logged record, deep merges and deletes of nested keys,
concurrent clients whose logged updates share group commits, retention and gc, a failed save, a daemon
SIGKILLed mid-save and restarted (which then saves the replayed log, reason ``recovery``), a job deleted
and recreated — with every request and ack marked in the trace (see :mod:`.fstrace`)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..client.admin import Admin
from ..client.sync import Client
from ..tree import DELETE
from .crashsim import History
from .fstrace import daemon_env, mark
from .private import PrivateDaemon

# A known write speed: no 32 MiB probe at every (re)start, which would dominate a run of many restarts.
CONFIG = ('write_speed = "200MiB"\nchunk_size = "64KiB"\n'
          '[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\nkeep_last = 2\n'
          'compression = "auto"\n')
JOBS = ["a", "b", "c"]
# Job "c" is written by this many clients at once (each its own keys), this many logged updates each.
CONCURRENT_CLIENTS = 3
CONCURRENT_UPDATES = 3


@dataclass
class Recorded:
    trace: Path
    history: History
    jobs: list[str]
    config: str
    daemon_exits: int  # unexpected exits (the one planned SIGKILL is not counted)


class _Driver:
    def __init__(self, root: Path, rounds: int, seed: int) -> None:
        self.root = root
        self.trace = root / "fs.trace"
        self.faults = root / "faults"
        self.history = History()
        self.rng = np.random.default_rng(seed)
        self.rounds = rounds
        state_dir = os.path.realpath(root) + "/state"
        self.env = {**daemon_env(str(self.trace), state_dir), "AUTOSAVED_FAULTS_FILE": str(self.faults)}
        self.daemon = PrivateDaemon(Path(os.path.realpath(root)), config=CONFIG, log_level="info", env=self.env)
        self.clients: dict[str, Client] = {}
        self.unexpected_exits = 0

    def mark(self, **fields: Any) -> None:
        mark(str(self.trace), **fields)

    def client(self, job: str) -> Client:
        c = self.clients.get(job)
        if c is None:
            c = self.clients[job] = Client(job, address=self.daemon.address, timeout=20, save_timeout=60,
                                           on_state_lost=lambda exc: None)
            c.connect()
        return c

    def drop_clients(self) -> None:
        for c in self.clients.values():
            with suppress(Exception):
                c.close()
        self.clients.clear()

    def update(self, job: str, delta: Mapping[Any, Any], wait: str) -> None:
        n = self.history.apply(job, delta)
        self.mark(ev="sent", what="update", job=job, n=n)
        self.client(job).update(delta, wait=wait)
        self.mark(ev="ack", what="update", job=job, n=n, level=wait)

    def save(self, job: str) -> bool:
        n = self.history.n.get(job, 0)
        self.mark(ev="sent", what="save", job=job, n=n)
        try:
            self.client(job).save()
        except Exception:
            return False
        self.mark(ev="ack", what="save", job=job, n=n, level="committed")
        return True

    def request(self, job: str, op: str) -> Any:
        """An admin request (``delete`` or ``gc``) about ``job``."""
        with Admin(address=self.daemon.address, timeout=60.0) as admin:
            return admin.delete(job) if op == "delete" else admin.gc(job)

    def delete(self, job: str) -> None:
        n = self.history.n.get(job, 0)
        self.mark(ev="sent", what="delete", job=job, n=n)
        self.request(job, "delete")
        self.history.deleted(job)
        self.clients.pop(job).close()
        self.mark(ev="ack", what="delete", job=job, n=n)

    def concurrent(self, job: str) -> None:
        """Several clients stream logged updates of ``job`` at once, so the daemon's group commit puts
        several records in one batch (one sync): a power cut may keep a later record of a batch and lose
        an earlier one."""
        start = threading.Barrier(CONCURRENT_CLIENTS)
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                with Client(job, address=self.daemon.address, timeout=20, save_timeout=60,
                            on_state_lost=lambda exc: None) as c:
                    start.wait(30)
                    for k in range(1, CONCURRENT_UPDATES + 1):
                        delta = {f"k{i}": {"n": k, "v": np.full(3000 + 500 * i, k, np.uint8)}}
                        n = self.history.apply_concurrent(job, str(i), delta)
                        self.mark(ev="sent", what="update", job=job, client=str(i), n=n)
                        c.update(delta, wait="logged")
                        self.mark(ev="ack", what="update", job=job, client=str(i), n=n, level="logged")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(CONCURRENT_CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def arr(self, nbytes: int) -> np.ndarray[Any, Any]:
        return self.rng.integers(0, 255, nbytes, dtype=np.uint8)

    def restart_after(self, rule: str, job: str) -> None:
        """Arm a SIGKILL fault inside the next save of ``job``, save, and restart the daemon."""
        self.faults.write_text(rule + "\n")
        self.mark(ev="sent", what="save", job=job, n=self.history.n.get(job, 0))
        with suppress(Exception):
            c = self.client(job)
            c.save_timeout = 5
            c.save()
        assert self.daemon.proc is not None
        self.daemon.proc.wait(30)  # it must be dead: the fault kills it
        self.faults.unlink()
        self.drop_clients()
        self.daemon.start(timeout=60)

    def run(self) -> None:
        d = self.daemon
        d.start(timeout=60)
        try:
            self.script()
        finally:
            self.drop_clients()
            d.kill()  # the power cut comes after the last op in the trace
            d.cleanup()

    def script(self) -> None:
        big = self.arr(150_000)
        self.update("a", {"n": 0, "big": big, "zeros": np.zeros(140_000, np.uint8), "t": (1, "x", b"\x00"),
                          7: {"int key": True}}, "logged")
        self.update("b", {"n": 0, "w": np.arange(20_000, dtype=np.float32)}, "committed")
        self.save("a")
        # accepted updates (deep merges, a nested delete) that only the next logged record makes durable
        self.update("a", {"n": 1, "deep": {"x": {"y": {"z": 1}, "keep": True}}}, "accepted")
        self.update("a", {"n": 1, "deep": {"x": {"y": DELETE}, "w": [1, 2]}}, "accepted")
        self.update("a", {"n": 1, "small": {"k": 1}}, "logged")
        self.concurrent("c")
        # A save that fails after its chunks are renamed in but before their directories are fsynced.
        self.update("a", {"n": 2, "fresh": self.arr(200_000)}, "logged")
        self.faults.write_text("chunk.fsync_dir.before 1 eio\n")
        self.save("a")
        self.faults.unlink()
        self.update("a", {"n": 3}, "logged")
        self.save("a")
        # A daemon SIGKILLed after the second chunk rename of a save; the restarted one dedups them.
        self.update("a", {"n": 4, "late": self.arr(260_000)}, "logged")
        self.restart_after("chunk.rename.after 2 crash", "a")
        self.update("a", {"n": 5}, "logged")
        self.save("a")
        for r in range(self.rounds):
            self.update("a", {"n": 6 + r, "small": {"k": r}, "big": self.arr(150_000)}, "logged")
            self.update("b", {"n": 1 + r, "w": np.full(20_000, r, np.float32), "s": "x" * r}, "logged")
            if r % 2 == 0:
                self.save("a")
            else:
                self.update("b", {"tail": r}, "committed")
            self.request("a", "gc")
        self.delete("b")
        self.update("b", {"n": 100, "again": np.ones(70_000, np.uint8)}, "logged")
        self.save("b")
        self.update("a", {"n": 200, "small": {"k": -1}}, "logged")  # log records past the last version
        self.update("b", {"n": 101}, "logged")


def record(root: Path, *, rounds: int = 2, seed: int = 1) -> Recorded:
    """Run the workload against a traced daemon under ``root`` and return what the checker needs."""
    root.mkdir(parents=True, exist_ok=True)
    drv = _Driver(root, rounds, seed)
    drv.run()
    return Recorded(trace=drv.trace, history=drv.history, jobs=list(JOBS), config=CONFIG,
                    daemon_exits=drv.unexpected_exits)


__all__ = ["CONFIG", "JOBS", "Recorded", "record"]
