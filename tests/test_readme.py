"""The README's Python examples run as written, against a real private daemon."""

from __future__ import annotations

import re
from pathlib import Path

from autosaved.bench.private import PrivateDaemon

from .conftest import run_python

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(daemon: PrivateDaemon) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        run_python(block, AUTOSAVED_ADDRESS=daemon.address, AUTOSAVED_STATE_DIR=str(daemon.state_dir))


def test_readme_commands_exist() -> None:
    text = README.read_text()
    assert "pip install . && autosaved serve" in text
    assert ".venv/bin/python -m pytest -q" in text
    ci = (README.parent / ".ci" / "run").read_text()
    test_command = re.search(r"```sh\n(python3 -m venv .*pytest -q)\n```", text)
    assert test_command and test_command.group(1) in ci
