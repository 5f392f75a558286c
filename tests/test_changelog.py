"""CHANGELOG.md names the current version of every format, and the release the code reports."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import autosaved
from autosaved import protocol
from autosaved.cli import exchange
from autosaved.storage import hashing, manifest, wal

ROOT = Path(__file__).resolve().parent.parent
CHANGELOG = (ROOT / "CHANGELOG.md").read_text()


def test_every_format_version_in_the_code_is_in_the_changelog() -> None:
    from autosaved.integrations import globalver

    rows = {
        f"wire protocol version {protocol.PROTOCOL_VERSION}": "protocol.PROTOCOL_VERSION",
        f"manifest format {manifest.FORMAT_VERSION}": "manifest.FORMAT_VERSION",
        f"log record format {wal.FORMAT_VERSION}": "wal.FORMAT_VERSION",
        f"export format {exchange.FORMAT}": "exchange.FORMAT",
        f"global version record format {globalver.RECORD_FORMAT}": "globalver.RECORD_FORMAT",
        f"named by {hashing.DEFAULT.upper()}": "hashing.DEFAULT",
    }
    # The transformers integration needs transformers; read its constant without importing it.
    source = (ROOT / "autosaved" / "integrations" / "transformers.py").read_text()
    hf = next(line.split("=")[1].strip() for line in source.splitlines() if line.startswith("FORMAT = "))
    rows[f"HF trainer state format {hf}"] = "transformers.FORMAT"
    missing = {text: where for text, where in rows.items() if text not in CHANGELOG}
    assert not missing, f"CHANGELOG.md's format table does not say {missing}: add the new version"


def test_version_is_one_and_printed() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == autosaved.__version__
    out = subprocess.run([sys.executable, "-m", "autosaved", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"autosaved {autosaved.__version__}"
    assert f"## {autosaved.__version__}" in CHANGELOG
