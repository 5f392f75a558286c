"""The README and the examples say what the code does (issue 22, item 12: stale text)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from autosaved import config
from autosaved.storage import hashing

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _paragraphs(text: str) -> list[str]:
    """Paragraphs and list items (a bullet is one item however many lines it wraps over)."""
    return [p for block in re.split(r"\n\s*\n", text) for p in re.split(r"\n(?=- |\| )", block)]


def test_readme_names_chunks_by_the_hash_the_code_uses() -> None:
    assert hashing.DEFAULT == hashing.BLAKE3
    stale = [p for p in _paragraphs(README) if "SHA-256" in p and "BLAKE3" not in p]
    assert not stale, "SHA-256 named as the chunk hash without BLAKE3 (new chunks):\n\n" + "\n\n".join(stale)


def test_metrics_server_is_described_as_the_daemons_own() -> None:
    source = (ROOT / "autosaved" / "daemon" / "metrics.py").read_text()
    assert "start_http_server" not in source and "make_wsgi_app" not in source  # the daemon's own responder
    assert "prometheus_client`'s server" not in README
    pyproject = (ROOT / "pyproject.toml").read_text()
    comment = pyproject[pyproject.index("# prometheus_client:"):pyproject.index('"prometheus_client>=')]
    assert "not prometheus_client's" in comment, comment


def test_socket_defaults_are_documented_truly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Without XDG_RUNTIME_DIR a user's socket lives in run/ inside the state dir; the README says so.
    monkeypatch.setattr(config, "_is_root", lambda: False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert config.default_socket_path(tmp_path) == tmp_path / "run" / config.SOCKET_NAME
    assert "when `XDG_RUNTIME_DIR` is unset" in README and "in `run/` inside the state dir" in README
    # socket_group unset: the daemon makes the socket folder 0700 (it chmods only for a group).
    app = (ROOT / "autosaved" / "daemon" / "paths.py").read_text()  # the socket folder is made there
    assert "sock_path.parent.mkdir(parents=True, mode=0o700)" in app and "if gid is not None:" in app
    line = README[README.index('socket_group = "autosaved"'):]
    line = line[:line.index("\nmetrics_address")]
    assert "0700" in line and "only the daemon's own user can connect" in line, line
    assert "default: the daemon's own group" not in README


EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.py"))


def _parser_calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute) and n.func.attr == "ArgumentParser"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_pass_their_whole_docstring_to_help(path: Path) -> None:
    """(``__doc__.splitlines()[0]`` cut the description mid-sentence.)"""
    calls = _parser_calls(path)
    assert len(calls) == 1, path
    kw = {k.arg: ast.unparse(k.value) for k in calls[0].keywords}
    assert kw.get("description") == "__doc__", (path.name, kw)
    assert kw.get("formatter_class") == "argparse.RawDescriptionHelpFormatter", (path.name, kw)


def test_examples_help_shows_their_whole_description() -> None:
    """Run for real where the example imports no framework at its top (the others take seconds to import
    torch; the check above covers them)."""
    light = [ROOT / "examples" / "agent_pipeline.py", ROOT / "examples" / "measure_compression.py"]
    for path in light:
        proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (path, proc.stderr)
        doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
        assert doc
        assert doc.strip() in proc.stdout, f"{path.name} --help:\n{proc.stdout}"
