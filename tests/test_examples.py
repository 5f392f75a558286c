"""The examples, run as a user would run them, killed with SIGKILL in the middle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from autosaved.testing.private import PrivateDaemon

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def start(script: str, address: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(EXAMPLES / script), "--address", address, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_until(proc: subprocess.Popen[str], marker: str) -> list[str]:
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if line.startswith(marker):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return seen
    raise AssertionError(f"never saw {marker!r}: {seen} {proc.stderr.read() if proc.stderr else ''}")


def finish(proc: subprocess.Popen[str]) -> list[str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out.splitlines()


def test_torch_loop_resumes_bit_identically(daemon: PrivateDaemon) -> None:
    pytest.importorskip("torch")
    reference = finish(start("train_loop.py", daemon.address, "--job", "ref", "--steps", "60"))
    run_until(start("train_loop.py", daemon.address, "--job", "killed", "--steps", "60", "--delay", "0.3"), "step 23 ")
    # the daemon saves the dead trainer's last state (idle policy), then is restarted for good measure
    assert daemon.stop(signal.SIGTERM) == 0
    daemon.start()
    resumed = finish(start("train_loop.py", daemon.address, "--job", "killed", "--steps", "60"))
    # killed during the sleep after step 23 was acknowledged (24 if the machine stalled that long)
    assert resumed[0] in ("resumed at step 23", "resumed at step 24")
    at = int(resumed[0].split()[-1])
    assert resumed[-1] == reference[-1] and reference[-1].startswith("done step 60 digest ")
    # every loss after the resume is the loss the uninterrupted run saw at that step
    assert resumed[1:-1] == reference[at + 1 : -1]


def test_agent_pipeline_resumes_at_the_right_stage(daemon: PrivateDaemon) -> None:
    reference = finish(start("agent_pipeline.py", daemon.address, "--job", "ref", "--stage-seconds", "0"))
    killed = run_until(start("agent_pipeline.py", daemon.address, "--job", "task", "--stage-seconds", "0.2"),
                       "finished research")
    assert killed[-1].startswith("finished research")
    resumed = finish(start("agent_pipeline.py", daemon.address, "--job", "task", "--stage-seconds", "0"))
    assert resumed[0] == "resuming after ['plan', 'research']"
    assert [ln for ln in resumed if ln.startswith("running")] == [
        "running draft", "running critique", "running revise", "running final"]
    assert resumed[-1] == reference[-1]
