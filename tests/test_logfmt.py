"""``log_format = "json"`` / ``serve --log-format json`` (issue 22): one JSON object per line with ``time``,
``level``, ``event`` and the fields, for log shippers; the message splitting is a pure function."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

import autosaved
from autosaved.logfmt import split_message
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, TEST_WRITE_SPEED, wait_for


@pytest.mark.parametrize(("message", "event", "fields"), [
    ("saved job=train-7 owner=1000 version=12 reason=interval ms=3.5",
     "saved", {"job": "train-7", "owner": 1000, "version": 12, "reason": "interval", "ms": 3.5}),
    ("save failed job=a error=[Errno 28] No space left on device",
     "save failed", {"job": "a", "error": "[Errno 28] No space left on device"}),
    ("task rpc failed; restarting it in 0.1s", "task rpc failed; restarting it in 0.1s", {}),
    ("config reloaded trigger=SIGHUP file=/etc/a.toml policy={'idle': 30.0, 'x': 1}",
     "config reloaded", {"trigger": "SIGHUP", "file": "/etc/a.toml", "policy": "{'idle': 30.0, 'x': 1}"}),
])
def test_split_message(message: str, event: str, fields: dict[str, object]) -> None:
    assert split_message(message) == (event, fields)


def _objects(text: str) -> list[dict[str, object]]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    docs = [json.loads(line) for line in lines]  # every line is one JSON object
    for doc in docs:
        assert list(doc)[:3] == ["time", "level", "event"], doc
        datetime.fromisoformat(str(doc["time"]))
    return docs


def test_a_daemon_logs_json_lines(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon('log_format = "json"\n' + NO_AUTO_POLICY)
    with autosaved.Client("j", address=d.address) as c:
        c.update({"w": b"x" * 10}, step=3)
        c.save()
    assert d.stop() == 0
    docs = _objects(d.log())
    saved = [doc for doc in docs if doc["event"] == "saved"]
    assert saved and saved[0]["job"] == "j" and saved[0]["version"] == 1 and saved[0]["level"] == "info", saved


def test_serve_flag_and_a_bad_value(tmp_path: Path) -> None:
    sock = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp"))
    config = tmp_path / "a.toml"
    config.write_text(TEST_WRITE_SPEED)
    proc = subprocess.Popen([sys.executable, "-m", "autosaved", "serve", "--address", f"ipc://{sock}/d.sock",
                             "--state-dir", str(tmp_path / "state"), "--config", str(config), "--log-format", "json"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        wait_for(lambda: (sock / "d.sock").exists())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    events = [doc["event"] for doc in _objects(err)]
    assert any(str(e).startswith("serving") for e in events), events
    bad = subprocess.run([sys.executable, "-m", "autosaved", "serve", "--log-format", "xml"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'xml'" in bad.stderr
    config.write_text('log_format = "yaml"\n')
    bad = subprocess.run([sys.executable, "-m", "autosaved", "serve", "--config", str(config), "--state-dir",
                          str(tmp_path / "s2")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "log_format" in bad.stderr
