"""A private daemon in a temp dir, as a subprocess: what ``demo``, ``bench`` and the tests run, so they
never touch the user's own daemon or state."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from ..client.admin import Admin
from ..errors import AutosavedError, DaemonUnavailable


class PrivateDaemon:
    def __init__(self, root: Path | None = None, *, config: str = "", log_level: str = "info",
                 env: dict[str, str] | None = None, command_prefix: Sequence[str] = ()) -> None:
        # ipc paths are limited to 107 bytes, so the socket lives in a short temp dir of its own.
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="autosaved-"))
        self.state_dir = self.root / "state"
        self.sock_dir = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
        self.address = f"ipc://{self.sock_dir}/d.sock"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "autosaved.toml"
        self.config_path.write_text(config)
        self.log_path = self.root / "daemon.log"
        self.log_level = log_level
        self.env = env
        # Run the daemon under another command (``ip netns exec NS``: a host on a network of its own).
        self.command_prefix = list(command_prefix)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 60.0) -> PrivateDaemon:
        # 60 s, like every wait of the tests: a first start probes the disk (write_speed "auto"), which on a busy
        # host with a slow disk took over 20 s (bench dcp failed so under load).
        self._log = self.log_path.open("ab")
        env = {**os.environ, **(self.env or {})}
        if "NOTIFY_SOCKET" not in (self.env or {}):
            env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            [*self.command_prefix, sys.executable, "-m", "autosaved", "serve", "--address", self.address, "--state-dir",
             str(self.state_dir), "--config", str(self.config_path), "--log-level", self.log_level],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AutosavedError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with Admin(address=self.address, timeout=0.5) as probe:
                    probe.ping()
                    return
            except DaemonUnavailable:
                time.sleep(0.05)
        raise AutosavedError(f"daemon did not become ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``signum`` and wait for the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        finally:
            if self._log:
                self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        if self._log:
            self._log.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PrivateDaemon:
        try:
            return self.start()
        except BaseException:  # a start that failed or was interrupted (SIGTERM, Ctrl-C): no daemon left behind
            self.cleanup()
            raise

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()
