"""Each extra installs what its README example imports (issue 22: ``pip install 'autosaved[langgraph]'``
did not install LangGraph, so the README's snippet failed with ``No module named 'langgraph.graph'``).

Every Python block of the README and every script in ``examples/`` is an example; the extras it names
(``autosaved[X]``) plus the base dependencies must provide every module it imports. Which distribution
provides a module is read from the installed packages' file lists (``importlib.metadata``), so a
namespace such as ``langgraph`` (shared by ``langgraph`` and ``langgraph-checkpoint``) is resolved to the
distribution that ships the submodule imported.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def _project() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return base, extras


def _requires(dist: str, seen: set[str] | None = None) -> set[str]:
    """``dist`` and everything it installs (its own requirements without extras, recursively)."""
    seen = set() if seen is None else seen
    if dist in seen:
        return seen
    seen.add(dist)
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        return seen
    for r in reqs:
        if "extra ==" not in r and 'extra==' not in r:
            _requires(_name(r), seen)
    return seen


def _imports(source: str) -> set[str]:
    """Dotted modules imported at any level, from third parties (not the standard library, not autosaved)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    # An integration module the example uses needs its framework too: follow it (one level).
    for m in sorted(out):
        path = ROOT / (m.replace(".", "/") + ".py")
        if m.startswith("autosaved.integrations.") and path.exists():
            out |= _imports(path.read_text())
    return {m for m in out if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "autosaved"
            and m != "__future__"}


def _provider(module: str) -> str:
    """The installed distribution that ships ``module`` (the deepest path of it that one ships)."""
    parts = module.split(".")
    candidates = md.packages_distributions().get(parts[0], [])
    for depth in range(len(parts), 0, -1):
        stem = "/".join(parts[:depth])
        for dist in candidates:
            files = md.files(dist) or []
            if any(str(f).startswith(stem + "/") or str(f) == stem + ".py" for f in files):
                return _name(dist)
    raise AssertionError(f"no installed distribution ships {module!r} (install the test extra)")


def _examples() -> list[tuple[str, str]]:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    out = [(f"README.md python block {i + 1}", b) for i, b in enumerate(blocks)]
    out += [(f"examples/{p.name}", p.read_text()) for p in sorted((ROOT / "examples").glob("*.py"))]
    return out


@pytest.mark.parametrize(("where", "source"), _examples(), ids=[w for w, _ in _examples()])
def test_every_example_import_is_installed_by_the_extras_it_names(where: str, source: str) -> None:
    base, extras = _project()
    named = set(re.findall(r"autosaved\[([a-z0-9_,-]+)\]", source))
    named = {e for group in named for e in group.split(",")}
    assert named <= set(extras), f"{where} names unknown extras {sorted(named - set(extras))}"
    installed: set[str] = set()
    for dist in base | {d for e in named for d in extras[e]}:
        installed |= _requires(dist)
    missing = {m: _provider(m) for m in _imports(source)}
    missing = {m: d for m, d in missing.items() if d not in installed}
    assert not missing, (f"{where} imports {missing} (module: distribution), which neither the base dependencies "
                         f"nor the extras it names ({sorted(named) or 'none'}) install")


def test_no_extra_is_left_unnamed() -> None:
    """Each framework extra is named by an example, so the check above covers it."""
    _, extras = _project()
    named = {e for _, source in _examples() for e in re.findall(r"autosaved\[([a-z0-9_-]+)\]", source)}
    assert {"langgraph", "transformers", "lightning", "torch"} <= named, named
    assert named <= set(extras)
