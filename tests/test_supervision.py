"""No failure inside one task, one job or one connection takes the daemon down (issue 9, defect 1).

Failures are injected with the fault file (``AUTOSAVED_FAULTS_FILE``, see autosaved/storage/faults.py):
``raise`` throws a RuntimeError (a bug) at a named point of the real code. After each, the daemon still
serves every job, saves what it accepted, and exits cleanly on SIGTERM. The fd limit test uses a real
``RLIMIT_NOFILE`` on the real daemon process and real idle connections.
"""

from __future__ import annotations

import re
import resource
import signal
import socket
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import autosaved
from autosaved.errors import AutosavedError
from autosaved.protocol import pack_header, unpack_header
from autosaved.shm import fd_socket_path
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, fault_fired, free_port, wait_for


class Pinger:
    """One zmq connection made up front: it keeps working when the daemon cannot accept new ones."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.connect(address)
        self.seq = 0

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        self.sock.send_multipart([pack_header({"v": 1, "op": op, "seq": self.seq, **fields})])
        while True:
            assert self.sock.poll(60_000), "no reply"
            reply = unpack_header(self.sock.recv_multipart()[0])
            if reply.get("seq") == self.seq:
                return reply

    def close(self) -> None:
        self.sock.close(0)


def still_serving(d: PrivateDaemon, job: str = "after") -> None:
    """The daemon is up, accepts, saves and restores; then a SIGTERM ends it cleanly."""
    assert d.proc is not None and d.proc.poll() is None, d.log()
    with autosaved.Client(job, address=d.address) as c:
        c.update({"w": np.arange(100, dtype=np.float32), "n": 1}, wait="committed")
        got = c.restore()
        assert got["n"] == 1 and np.array_equal(got["w"], np.arange(100, dtype=np.float32))


def stops_cleanly(d: PrivateDaemon) -> None:
    assert d.stop(signal.SIGTERM) == 0, d.log()


@pytest.fixture
def faulty(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> Iterator[Callable[..., Any]]:
    faults = tmp_path / "faults"

    def make(rules: str, config: str = NO_AUTO_POLICY) -> tuple[PrivateDaemon, Path]:
        faults.write_text(rules)
        return make_daemon(config, env={"AUTOSAVED_FAULTS_FILE": str(faults)}), faults

    yield make


# -- a failure inside one job's save or log append is that job's error ----------------------------------


def test_a_bug_in_a_save_is_the_jobs_error_and_is_retried(faulty: Callable[..., Any]) -> None:
    d, faults = faulty("")
    with autosaved.Client("bug", address=d.address) as c:
        c.update({"x": 1})
        faults.write_text("manifest.open.before 1 raise\n")  # a RuntimeError in the save's worker thread
        with pytest.raises(AutosavedError, match="injected failure"):
            c.save()
        assert c.status()["last_error"]
        assert c.save() >= 1  # the retry succeeds: the bug cost one save, not the daemon
        assert c.restore() == {"x": 1}
    still_serving(d)
    stops_cleanly(d)


def test_a_bug_in_a_log_append_is_the_jobs_error(faulty: Callable[..., Any]) -> None:
    d, faults = faulty("")
    with autosaved.Client("lbug", address=d.address) as c:
        c.update({"x": 1}, wait="logged")
        faults.write_text("wal.write.before 1 raise\n")
        with pytest.raises(AutosavedError):
            c.update({"x": 2}, wait="logged")
        # The update is held in memory and a snapshot is saved; logging resumes after it.
        wait_for(lambda: c.status()["latest_version"] is not None, timeout=60)
        wait_for(lambda: c.status()["wal_error"] is None, timeout=60)
        c.update({"x": 3}, wait="logged")
        assert c.restore() == {"x": 3}
    d.kill()
    d.start()
    assert autosaved.restore("lbug", state_dir=d.state_dir) == {"x": 3}
    still_serving(d)
    stops_cleanly(d)


# -- every long-lived task restarts after a failure --------------------------------------------------


@pytest.mark.parametrize("task", ["rpc", "scheduler", "signals", "reloader", "watchdog", "iocontrol", "metrics",
                                  "preemption", "collector"])
def test_a_task_that_fails_at_start_is_restarted(faulty: Callable[..., Any], task: str) -> None:
    port = free_port()
    # The preemption watcher runs only when configured: point it at a closed local port (it logs and polls on).
    preemption = f'[preemption]\nprovider = "aws"\nendpoint = "http://127.0.0.1:{free_port()}"\n'
    config = f'metrics_address = "127.0.0.1:{port}"\n' + NO_AUTO_POLICY + (preemption if task == "preemption" else "")
    d, faults = faulty(f"task.{task}.start 1 raise\n", config)
    fault_fired(faults, f"task.{task}.start")
    # No wait for the restarted task itself: it runs in the event-loop step that logs this line, before
    # the loop handles any request still_serving sends (and signals queue in the receiver meanwhile).
    wait_for(lambda: f"task {task} restarting" in d.log(), timeout=30)
    still_serving(d)
    with autosaved.Admin(address=d.address) as admin:
        assert admin.status()["daemon"]["task_restarts"] == 1  # reported, not only logged
    if task == "metrics":
        wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).status == 200,
                 timeout=30)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert re.search(r"^autosaved_task_restarts_total 1(\.0)?$", text, re.M), text
    stops_cleanly(d)


@pytest.mark.parametrize("task", ["rpc", "scheduler", "writer", "logger", "fd", "metrics"])
def test_a_failure_inside_a_task_costs_one_piece_of_work(faulty: Callable[..., Any], task: str) -> None:
    port = free_port()
    d, faults = faulty("", f'metrics_address = "127.0.0.1:{port}"\n' + '[policy]\nidle = "0.2s"\nmin_gap = "0s"\n')
    faults.write_text(f"task.{task}.before 1 raise\n")

    def attempt(call: Callable[[], Any]) -> None:
        try:
            call()
        except AutosavedError as exc:  # the one piece of work that failed: this request's error, nothing more
            assert "injected failure" in str(exc)

    c = autosaved.Client("t", address=d.address)
    attempt(c.connect)
    attempt(lambda: c.update({"x": 1}, wait="logged"))
    attempt(c.save)
    c.close()
    if task == "fd":
        path = fd_socket_path(d.address)
        assert path is not None
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
            s.settimeout(30)
            s.connect(path)
            assert "token" in msgpack.unpackb(s.recv(4096))
            s.send(msgpack.packb({"op": "drop", "slot": 1}))
            reply = msgpack.unpackb(s.recv(4096))
            assert reply["ok"] is False and "injected" in reply["message"]
            s.send(msgpack.packb({"op": "drop", "slot": 1}))
            assert msgpack.unpackb(s.recv(4096))["ok"]
    if task == "metrics":
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).status == 200
    wait_for(lambda: f"injected failure at task.{task}" in d.log(), timeout=30)
    fault_fired(faults, f"task.{task}.before")
    still_serving(d)
    with autosaved.Client("t", address=d.address) as c:
        c.update({"x": 2}, wait="committed")
        assert c.restore() == {"x": 2}
    stops_cleanly(d)


# -- accept() under EMFILE, and the connection cap ------------------------------------------------------


def test_running_out_of_fds_backs_off_and_keeps_serving(make_daemon: Callable[..., PrivateDaemon]) -> None:
    port = free_port()
    d = make_daemon(f'metrics_address = "127.0.0.1:{port}"\n' + NO_AUTO_POLICY)
    assert d.proc is not None
    pinger = Pinger(d.address)
    assert pinger.call("ping")["ok"]
    with autosaved.Client("fds", address=d.address) as c:
        c.update({"x": 1}, wait="committed")
    _soft, hard = resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE)
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (100, hard))  # `ulimit -n 100` on the daemon
    path = fd_socket_path(d.address)
    assert path is not None
    idle: list[socket.socket] = []
    try:
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.connect(path)  # completes from the backlog even when the daemon cannot accept
            idle.append(s)
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        wait_for(lambda: "accept failed" in d.log() or d.proc.poll() is not None, timeout=60)  # type: ignore[union-attr]
        assert d.proc.poll() is None, d.log()
        assert pinger.call("ping")["ok"]  # the rpc socket still serves
        assert pinger.call("save", job="fds")["ok"]
    finally:
        for s in idle:
            s.close()
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (1024, hard))
    assert d.proc.poll() is None, d.log()
    # Once fds are free again, new connections are accepted on both listeners.
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(30)
        s.connect(path)
        assert "token" in msgpack.unpackb(s.recv(4096))
    wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).status == 200,
             timeout=60)
    pinger.close()
    still_serving(d)
    stops_cleanly(d)


def test_connections_past_the_cap_wait_until_one_closes(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon("max_connections = 4\n" + NO_AUTO_POLICY)
    path = fd_socket_path(d.address)
    assert path is not None
    conns = []
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(30)
        s.connect(path)
        assert "token" in msgpack.unpackb(s.recv(4096))
        conns.append(s)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    extra.settimeout(2)
    extra.connect(path)
    with pytest.raises(TimeoutError):
        extra.recv(4096)  # not accepted: the cap holds
    conns.pop().close()
    extra.settimeout(30)
    assert "token" in msgpack.unpackb(extra.recv(4096))  # accepted once one closed
    extra.close()
    for s in conns:
        s.close()
    still_serving(d)


def test_an_error_that_escapes_still_saves_every_dirty_job_before_exit(faulty: Callable[..., Any]) -> None:
    d, faults = faulty("task.main.before 1 raise\n")  # fires in the main flow, after SIGTERM, outside any task
    with autosaved.Client("esc", address=d.address) as c:
        c.update({"w": np.arange(50, dtype=np.int64), "n": 7})  # accepted only: no save policy
    assert d.stop(signal.SIGTERM) == 1, d.log()  # an unexpected error: exit 1, but after the flush
    assert "saving every dirty job, then exiting" in d.log()
    fault_fired(faults, "task.main.before")
    got = autosaved.restore("esc", state_dir=d.state_dir)
    assert got["n"] == 7 and np.array_equal(got["w"], np.arange(50, dtype=np.int64))


# -- tasks the daemon starts for its helpers are supervised too -------------------------------------------


def test_a_log_flusher_that_fails_is_restarted_and_logs_the_update(faulty: Callable[..., Any]) -> None:
    """A flusher that finds the job's log lock taken waits for it in a task of its own (task.walflush):
    a bug there is logged and the task restarted, and the update it carries is still logged."""
    d, faults = faulty("")
    with autosaved.Client("wf", address=d.address) as c:
        c.update({"x": 1}, wait="logged")
        c.save()  # the log rotates at the snapshot: the next save has a covered segment to delete
        c.update({"x": 2}, wait="logged")
        # The next save deletes that segment holding the log lock, stalled there; the update sent
        # meanwhile finds the lock taken and its flusher task fails once at its start.
        faults.write_text("wal.delete.before 1 sleep:4\ntask.walflush.start 1 raise\n")
        c.save()
        fault_fired(faults, "wal.delete.before")  # the save holds the log lock, stalled
        ack = c.update({"x": 3}, wait="logged")
        assert ack.level == "logged"
        fault_fired(faults, "task.walflush.start")
        assert "task walflush restarting" in d.log()
    d.kill()
    d.start()
    assert autosaved.restore("wf", state_dir=d.state_dir) == {"x": 3}
    still_serving(d)
    stops_cleanly(d)


@pytest.mark.parametrize("task", ["replica", "attach", "uploadrate", "probe", "remotedelete"])
def test_a_replication_task_that_fails_at_start_is_restarted(faulty: Callable[..., Any], s3server: Any,
                                                             monkeypatch: pytest.MonkeyPatch, task: str) -> None:
    """The replicator's tasks (a job's upload loop, the attach of stored jobs at start, the upload-rate
    sampler, the probe of a store that was down at start, the completion of a bucket delete left pending)
    are supervised: one fails at its start, the daemon logs it, restarts it and serves on; a job's upload
    loop restarted still replicates."""
    for k, v in s3server.env.items():
        monkeypatch.setenv(k, v)
    # "probe" runs only when the store did not answer at start, and a delete stays pending (its completion
    # a task of its own) only when the store cannot be reached: point those at a closed port.
    down = task in ("probe", "remotedelete")
    endpoint = f"http://127.0.0.1:{free_port()}" if down else s3server.endpoint
    config = (NO_AUTO_POLICY + f'[remote]\nurl = "{s3server.url(f"sup-{task}")}"\nendpoint = "{endpoint}"\n'
              'timeout = "1s"\n')
    d, faults = faulty(f"task.{task}.start 1 raise\n", config)
    with autosaved.Client("rep", address=d.address) as c:
        if task == "replica":  # the job's loop starts when the job is loaded
            assert c.update({"x": 1}, wait="replicated").level == "replicated"
        if task == "remotedelete":
            c.update({"x": 1}, wait="committed")
            with autosaved.Admin(address=d.address) as admin:
                assert admin.delete("rep")["remote"]["state"] == "pending"
        fault_fired(faults, f"task.{task}.start")
        wait_for(lambda: f"task {task} restarting" in d.log(), timeout=30)
    with autosaved.Admin(address=d.address) as admin:
        assert admin.status()["daemon"]["task_restarts"] == 1
    if not down:
        still_serving(d)
    stops_cleanly(d)
