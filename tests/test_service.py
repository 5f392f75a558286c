"""The systemd side: the unit file passes systemd's own checks, and the daemon speaks sd_notify."""

from __future__ import annotations

import itertools
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
from pathlib import Path

import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, dropped_notifications, fault_fired, wait_for

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this host")


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's ``autosaved`` (verify checks it exists)."""
    exe = Path(sys.executable).with_name("autosaved")
    assert exe.exists(), exe
    text = (UNIT_DIR / "autosaved.service").read_text()
    assert "ExecStart=/usr/local/bin/autosaved " in text
    unit = tmp_path / "autosaved.service"
    unit.write_text(text.replace("ExecStart=/usr/local/bin/autosaved ", f"ExecStart={exe} "))
    return unit


@needs_analyze
def test_unit_verifies_clean(tmp_path: Path) -> None:
    assert ANALYZE is not None
    proc = subprocess.run([ANALYZE, "verify", str(_unit_copy(tmp_path))], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and not proc.stdout.strip() and not proc.stderr.strip(), proc.stdout + proc.stderr


@needs_analyze
def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    assert ANALYZE is not None
    # systemd 252 takes the threshold in tenths (0..100): 20 is an exposure of 2.0.
    proc = subprocess.run([ANALYZE, "security", "--offline=true", "--threshold=20", "--no-pager",
                           str(_unit_copy(tmp_path))], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for autosaved.service: (\d+\.\d)", proc.stdout)
    assert match is not None and float(match.group(1)) <= 2.0, proc.stdout


def test_unit_keeps_what_the_daemon_needs() -> None:
    """Hardening that would silently break the daemon must stay out of the unit."""
    lines = {ln.split("=", 1)[0]: ln.split("=", 1)[1] for ln in (UNIT_DIR / "autosaved.service").read_text()
             .splitlines() if "=" in ln and not ln.startswith("#")}
    assert lines["Type"] == "notify" and lines["NotifyAccess"] == "main"
    # A user namespace would map every client to the overflow uid: jobs could no longer be told apart.
    assert lines.get("PrivateUsers", "no") == "no"
    # The throttle reads /proc/pressure, /proc/diskstats and /proc/meminfo.
    assert "ProcSubset" not in lines
    # A dead client's shared-memory slots are found by its pid in /proc.
    assert "ProtectProc" not in lines
    assert lines["UMask"] == "0077" and lines["StateDirectoryMode"] == "0700"
    assert lines["RuntimeDirectoryMode"] == "0750"


class NotifyListener:
    """What systemd would see: a datagram socket bound at $NOTIFY_SOCKET, read as messages arrive (a
    Unix datagram queue holds only a few messages, so reading afterwards would miss some)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        # Called on each message as it arrives, to record what was true at that instant.
        self.probe: Callable[[str], None] = lambda _msg: None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.probe(data.decode())
            self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        return [m for _, m in list(self.messages)]

    def collect(self, until: Callable[[list[str]], bool], timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while not until(self.texts()):
            if time.monotonic() > deadline:
                raise AssertionError(f"not seen within {timeout}s; got {self.messages!r}")
            time.sleep(0.02)
        return self.texts()

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[NotifyListener]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    sock_dir = Path(tempfile.mkdtemp(prefix="as-n-", dir="/tmp"))
    lst = NotifyListener(sock_dir / "notify")
    yield lst
    lst.close()
    shutil.rmtree(sock_dir, ignore_errors=True)


def test_sd_notify_ready_watchdog_status_stopping(make_daemon: Callable[..., PrivateDaemon],
                                                  listener: NotifyListener) -> None:
    d = make_daemon(NO_AUTO_POLICY, start=False,
                    env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000"})
    bound_at_ready: list[bool] = []
    sock_path = Path(d.address.removeprefix("ipc://"))
    listener.probe = lambda msg: bound_at_ready.append(sock_path.exists()) if "READY=1" in msg else None
    d.start()
    msgs = listener.collect(lambda ms: any("READY=1" in m for m in ms))
    ready = next(m for m in msgs if "READY=1" in m)
    assert d.proc is not None and f"MAINPID={d.proc.pid}" in ready
    assert bound_at_ready == [True]  # the socket was bound when systemd was told READY=1

    # pinged while it serves (at half of WATCHDOG_USEC; how regularly is a matter of the host's load)
    listener.collect(lambda ms: sum(m == "WATCHDOG=1" for m in ms) >= 4, timeout=30)

    # STATUS= is sent when it changes (a dropped datagram counts as sent: the daemon logs it)
    with autosaved.Client("busy", address=d.address) as c:
        c.update({"x": b"12345"})
    listener.collect(lambda ms: any(m.startswith("STATUS=1 jobs, 1 dirty") for m in ms + dropped_notifications(
        d.log())), timeout=60)
    with autosaved.Client("busy", address=d.address) as c:
        c.save()
    listener.collect(lambda ms: any("last save busy v1" in m for m in ms + dropped_notifications(d.log())),
                     timeout=60)

    d.send_signal(signal.SIGTERM)
    listener.collect(lambda ms: any("STOPPING=1" in m for m in ms))
    assert d.proc is not None and d.proc.wait(30) == 0


def _longest_ping_gap(listener: NotifyListener, since: float) -> float:
    pings = [t for t, m in list(listener.messages) if m == "WATCHDOG=1"]
    return max((b - a for a, b in itertools.pairwise(pings) if b > since), default=0.0)


def _pings_after_a_gap(listener: NotifyListener, since: float, gap: float) -> int:
    """How many pings came after the first gap of at least ``gap`` seconds that ended after ``since``."""
    pings = [t for t, m in list(listener.messages) if m == "WATCHDOG=1"]
    ends = [i for i in range(1, len(pings)) if pings[i] > since and pings[i] - pings[i - 1] >= gap]
    return len(pings) - ends[0] if ends else 0


def _watched_daemon(make_daemon: Callable[..., PrivateDaemon], listener: NotifyListener,
                    faults: Path) -> PrivateDaemon:
    faults.write_text("")
    d = make_daemon(NO_AUTO_POLICY, env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "400000",
                                         "AUTOSAVED_FAULTS_FILE": str(faults)})
    listener.collect(lambda ms: sum(m == "WATCHDOG=1" for m in ms) >= 3, timeout=30)
    return d


def test_no_watchdog_ping_while_the_event_loop_is_blocked(make_daemon: Callable[..., PrivateDaemon],
                                                          listener: NotifyListener, tmp_path: Path) -> None:
    """The daemon's own event loop hangs for 6 s (a synchronous sleep at the top of its rpc loop, through
    the fault point ``loop.tick.before``): the pings come from that loop, so none are sent meanwhile, where
    a helper thread would have kept pinging every 0.2 s; they resume when it does."""
    faults = tmp_path / "faults"
    d = _watched_daemon(make_daemon, listener, faults)
    armed = time.monotonic()
    faults.write_text("loop.tick.before 1 sleep:6\n")
    fault_fired(faults, "loop.tick.before")
    # The rpc loop goes round within about a second (requests are answered from the socket's callback
    # meanwhile, so a request would not make it go round sooner): the loop hangs for 6 s, then pings
    # resume. Wait for exactly that: a gap of at least 3 s after arming, then 3 pings. (A reader thread
    # that lagged before the hang can shorten the gap it sees only by its lag.)
    wait_for(lambda: _pings_after_a_gap(listener, armed, 3.0) >= 3, timeout=60)
    with autosaved.Client("poke", address=d.address, timeout=120) as c:
        c.status()  # and it serves on
    assert d.proc is not None and d.proc.poll() is None


def test_watchdog_stops_when_the_rpc_loop_makes_no_progress(make_daemon: Callable[..., PrivateDaemon],
                                                            listener: NotifyListener, tmp_path: Path) -> None:
    """The rpc loop stalls for 9 s (``rpc.poll.before`` sleeps in a worker thread the loop awaits) while the
    event loop itself keeps running: the watchdog task notices the loop made no progress for 3 s, stops
    pinging and says so in the log; pings resume once the loop goes round again."""
    faults = tmp_path / "faults"
    d = _watched_daemon(make_daemon, listener, faults)
    armed = time.monotonic()
    faults.write_text("rpc.poll.before 1 sleep:9\n")
    fault_fired(faults, "rpc.poll.before")
    wait_for(lambda: "made no progress" in d.log(), timeout=60)
    count = len(listener.texts())
    listener.collect(lambda ms: sum(m == "WATCHDOG=1" for m in ms[count:]) >= 3, timeout=60)  # resumed
    assert _longest_ping_gap(listener, armed) >= 3.0, [t - armed for t, m in listener.messages if t >= armed]
    with autosaved.Client("poke", address=d.address, timeout=120) as c:
        c.status()  # and it serves again


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed on this host")
def test_sysusers_file_creates_the_service_user_and_group(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    proc = subprocess.run(["systemd-sysusers", "--dry-run", f"--root={tmp_path}",
                           str(UNIT_DIR / "autosaved.sysusers.conf")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Creating group 'autosaved'" in proc.stderr + proc.stdout
    assert "Creating user 'autosaved'" in proc.stderr + proc.stdout
