"""Deadline flushes with the real daemon: SIGTERM with more dirty state than the deadline allows, and a
spot/preemption notice served by a fake metadata service on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, dropped_notifications, version_files, wait_for

MiB = 1024 * 1024


def _random(nbytes: int, seed: int) -> np.ndarray:
    # Random content: equal chunks would be deduplicated and never written.
    return np.random.default_rng(seed).integers(0, 255, nbytes, dtype=np.uint8)


class NotifyListener:
    """A stand-in for systemd's notification socket (a datagram socket; the path must fit 107 bytes),
    drained by a thread as systemd would: the kernel queues only a few datagrams per socket."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="as-n-", dir="/tmp")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(f"{self.folder}/notify")
        self.sock.settimeout(0.1)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def getsockname(self) -> str:
        return f"{self.folder}/notify"

    def _drain(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                self.messages.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def notify_socket() -> Iterator[NotifyListener]:
    listener = NotifyListener()
    yield listener
    listener.close()


def sent_notifications(listener: NotifyListener, log: str, until: Callable[[str], bool]) -> str:
    """Everything the daemon sent: what the listener read, plus what the daemon logged as dropped (the
    kernel queues only 10 datagrams; a busy host may not schedule the reader in time). Waits until
    ``until`` holds for it, so the reader thread's lag is never a race."""
    dropped = "\n".join(dropped_notifications(log))

    def seen() -> str | None:
        text = "\n".join(listener.messages) + "\n" + dropped
        return text if until(text) else None

    found = wait_for(seen)
    assert isinstance(found, str)
    return found


def test_sigterm_commits_what_fits_and_reports_the_rest(
    make_daemon: Callable[..., PrivateDaemon], notify_socket: NotifyListener
) -> None:
    # A 4 MiB/s cap makes "cannot fit" deterministic: 48 MiB needs 12 s, the deadline is 2 s, while the
    # three 256 KiB jobs need a fraction of a second even on a loaded machine.
    d = make_daemon('shutdown_deadline = "2s"\n' + NO_AUTO_POLICY
                    + '[throttle]\nmax_write_rate = "4MiB"\nmin_write_rate = "1MiB"\n',
                    env={"NOTIFY_SOCKET": notify_socket.getsockname()})
    small = {f"small{i}": _random(256 * 1024, i) for i in range(3)}
    for job, arr in {**small, "big": _random(48 * MiB, 99)}.items():
        with autosaved.Client(job, address=d.address) as c:
            c.update({"x": arr, "name": job}, step=1)
    assert not any(version_files(d.state_dir, j) for j in [*small, "big"])

    started = time.monotonic()
    code = d.stop(signal.SIGTERM, timeout=120)
    elapsed = time.monotonic() - started
    log = d.log()
    assert code == 1, log  # something was lost: say so with the exit code
    # The big save was abandoned at the deadline, not finished: at the 4 MiB/s cap finishing it takes at
    # least 12 s whatever the host's speed (a bound on the logic, not on this host).
    assert elapsed < 48 / 4, f"exit took {elapsed:.1f}s\n{log}"
    for job, arr in small.items():
        assert np.array_equal(autosaved.restore(job, state_dir=d.state_dir)["x"], arr), log
        assert '"reason": "shutdown"' in version_files(d.state_dir, job)[-1].read_text()
    assert version_files(d.state_dir, "big") == []
    assert "job=big dirty_bytes=" in log and "more than the deadline leaves" in log  # planned last, said so
    assert "job=big NOT saved before the 2.0s deadline" in log
    assert "3/4 jobs committed" in log
    tmp = d.state_dir / "jobs"
    assert not list(tmp.glob("*/big/tmp/*")), "the abandoned save left temp files"
    told = sent_notifications(notify_socket, log, lambda t: "NOT saved" in t)
    assert "READY=1" in told and "STOPPING=1" in told
    assert told.count("EXTEND_TIMEOUT_USEC=") >= 4  # at the start and after each of the 3 commits
    # systemd's STATUS names the job that missed the deadline
    assert "STATUS=shutdown: 1 of 4 dirty jobs NOT saved before the deadline: big\n" in told + "\n", told


def test_status_shows_throttle_and_flush_estimates(make_daemon: Callable[..., PrivateDaemon]) -> None:
    # dirty_bytes left out: the daemon derives it from the write speed its startup probe measures (the one
    # test that keeps the probe: the others set write_speed) and the deadline.
    d = make_daemon('write_speed = "auto"\n[policy]\nidle = "off"\ninterval = "off"\nmin_gap = "0s"\n'
                    '[throttle]\nmax_write_rate = "100MiB"\nsample_interval = "100ms"\n')
    found = wait_for(lambda: re.search(r"policy\.dirty_bytes defaults to (\d+)", d.log()))
    assert isinstance(found, re.Match)
    derived = int(found.group(1))
    assert derived >= 64 * MiB and derived <= 100 * MiB * 25  # never more than the cap writes in the deadline
    with autosaved.Client("est", address=d.address) as c:
        c.update({"x": _random(10 * MiB, 1)})
        assert c.status()["policy"]["dirty_bytes"] == derived

    def sampled() -> dict[str, Any] | None:
        """The CLI's status once the throttle has sampled the disk (an allowed rate set)."""
        out = subprocess.run([sys.executable, "-m", "autosaved", "status", "--json", "--address", d.address],
                             capture_output=True, text=True, check=True)
        status: dict[str, Any] = json.loads(out.stdout)
        return status if status["daemon"]["throttle"].get("allowed_rate") else None

    status = wait_for(sampled, timeout=60)
    assert isinstance(status, dict)
    t = status["daemon"]["throttle"]
    assert t["enabled"] is True and 0 < t["allowed_rate"] <= 100 * MiB
    assert {"utilisation", "psi_some", "psi_full", "throttled_s", "dirty_writeback_bytes", "disks"} <= set(t)
    (job,) = status["jobs"]
    assert job["dirty_bytes"] >= 10 * MiB
    assert job["flush_estimate_s"] >= 0.1  # 10 MiB at ≤ 100 MiB/s
    human = subprocess.run([sys.executable, "-m", "autosaved", "status", "--address", d.address],
                           capture_output=True, text=True, check=True).stdout
    assert "allowed rate" in human and "FLUSH" in human


# -- preemption ------------------------------------------------------------------------------------


class FakeMetadata:
    """The three clouds' metadata endpoints, with the headers they insist on."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.preempted = False
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                fake.requests.append(("PUT", self.path, dict(self.headers)))
                if fake.provider == "aws" and self.path == "/latest/api/token":
                    if not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                        return self._reply(400, b"missing ttl")
                    return self._reply(200, b"AQAEAtoken==")
                self._reply(404, b"")

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, dict(self.headers)))
                h = self.headers
                if fake.provider == "aws" and self.path == "/latest/meta-data/spot/instance-action":
                    if h.get("X-aws-ec2-metadata-token") != "AQAEAtoken==":
                        return self._reply(401, b"")
                    if not fake.preempted:
                        return self._reply(404, b"<?xml version=\"1.0\"?><html>404 - Not Found</html>")
                    return self._reply(200, b'{"action": "terminate", "time": "2026-11-27T23:00:00Z"}',
                                       {"Content-Type": "text/plain"})
                if fake.provider == "gcp" and self.path == "/computeMetadata/v1/instance/preempted":
                    if h.get("Metadata-Flavor") != "Google":
                        return self._reply(403, b"Missing Metadata-Flavor:Google header.")
                    return self._reply(200, b"TRUE" if fake.preempted else b"FALSE",
                                       {"Metadata-Flavor": "Google", "Content-Type": "application/text"})
                if fake.provider == "azure" and self.path == "/metadata/scheduledevents?api-version=2020-07-01":
                    if h.get("Metadata") != "true":
                        return self._reply(400, b'{"error": "Bad request. Required metadata header not specified"}')
                    events = [{"EventId": "A123BC45-1234-5678-AB90-ABCDEF123456", "EventType": "Preempt",
                               "ResourceType": "VirtualMachine", "Resources": ["vm1"], "EventStatus": "Scheduled",
                               "NotBefore": "Fri, 27 Nov 2026 23:00:30 GMT", "Description": "", "EventSource":
                               "Platform", "DurationInSeconds": -1}] if fake.preempted else []
                    body = json.dumps({"DocumentIncarnation": 2 if fake.preempted else 1, "Events": events})
                    return self._reply(200, body.encode(), {"Content-Type": "application/json"})
                self._reply(404, b"not found")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(params=["aws", "gcp", "azure"])
def metadata(request: pytest.FixtureRequest) -> Iterator[FakeMetadata]:
    fake = FakeMetadata(request.param)
    yield fake
    fake.close()


def test_preemption_notice_commits_before_any_sigterm(
    make_daemon: Callable[..., PrivateDaemon], metadata: FakeMetadata
) -> None:
    d = make_daemon(NO_AUTO_POLICY + f'[preemption]\nprovider = "{metadata.provider}"\n'
                    f'endpoint = "{metadata.url}"\npoll_interval = "100ms"\n')
    for job in ("p1", "p2"):
        with autosaved.Client(job, address=d.address) as c:
            c.update({"x": np.arange(1000) * len(job), "job": job}, step=3)
    wait_for(lambda: len(metadata.requests) >= 3)  # the watcher polls, and sees no notice
    assert not any(version_files(d.state_dir, j) for j in ("p1", "p2"))

    metadata.preempted = True
    wait_for(lambda: all(version_files(d.state_dir, j) for j in ("p1", "p2")), timeout=60)
    assert d.proc is not None and d.proc.poll() is None  # no signal was sent: the notice alone did it
    for job in ("p1", "p2"):
        assert '"reason": "preemption"' in version_files(d.state_dir, job)[-1].read_text()
        assert autosaved.restore(job, state_dir=d.state_dir)["job"] == job
    assert "preemption notice" in d.log()

    # The daemon keeps serving until the SIGTERM, which then saves what arrived after the notice.
    with autosaved.Client("p1", address=d.address) as c:
        c.update({"late": True}, step=4)
    assert d.stop(signal.SIGTERM) == 0
    assert autosaved.restore("p1", state_dir=d.state_dir)["late"] is True


def test_status_names_are_truncated_sensibly() -> None:
    from autosaved.daemon.flush import missed_names

    assert missed_names(["big"]) == "big"
    names = [f"job{i}" for i in range(7)]
    assert missed_names(names) == "job0, job1, job2, job3, job4 (+2 more)"
    long = "x" * 128
    assert missed_names([long, "b"]) == "x" * 39 + "…, b"
