"""The README's Python examples run as written, against a real private daemon."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

import autosaved
from autosaved.storage.local import Store
from autosaved.testing.private import PrivateDaemon

from .conftest import run_python

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(daemon: PrivateDaemon) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        run_python(block, AUTOSAVED_ADDRESS=daemon.address, AUTOSAVED_STATE_DIR=str(daemon.state_dir))
    # The quick-start example did what its comments say: 100 steps, the deep merge and the delete, a
    # committed version, and the offline restore reads it back with no daemon involved.
    daemon.stop()
    state = autosaved.restore("my-job", state_dir=daemon.state_dir)
    assert state["step"] == 100 and np.array_equal(state["weights"], np.full(10, 100.0))
    assert state["progress"] == {"stage": "train", "done": [99]} and state["final"] is True
    versions = Store(daemon.state_dir).job(os.geteuid(), "my-job").list_versions()
    assert versions and all(v.ok for v in versions) and versions[-1].meta == {"stage": "train"}


def test_readme_commands_exist() -> None:
    text = README.read_text()
    assert "pip install . && autosaved serve" in text
    assert ".venv/bin/python -m pytest -q" in text
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"```sh\n(python3 -m venv .*pytest -q)\n```", text)
    assert test_command and test_command.group(1) in ci
