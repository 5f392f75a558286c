"""Code layout rules, checked on the source (AST), so they cannot drift:

- no module outside ``autosaved/client/`` touches a private member of the SDK (``c._call``, ``c._core``,
  ...): the CLI, the benchmarks, the demo and the tests use the public client and admin API;
- the daemon never imports the benchmarks, the demo or the private-daemon helper (``autosaved.bench``),
  nor the SDK's client half, and storage does not import the wire module;
- imports point down the layers of ``scripts/import_graph.py``, and ``import autosaved`` stays light;
- ``daemon/app.py`` stays a wiring of the daemon's helpers (a line bound).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "autosaved"
SDK_CLASSES = {"Client", "AsyncClient", "Admin", "AsyncAdmin"}
# White-box reads a test may make: test_shm checks which path the bytes took (slots made, fallback taken),
# which only the client's slot pool knows. Reads only; the pool's state is asserted, never driven.
# White-box guards that a test sees what it claims (the bytes really went through a lent slot; test_lazy:
# the priority of the lazy client's copy thread, read by running a probe on that thread).
# test_job_quota drives the daemon's own FdServer._request (not the SDK's SlotPool method of that name).
ALLOWED = {"tests/test_shm.py": {"_slots"}, "tests/test_accounting.py": {"_slots"},
           "tests/test_lazy.py": {"_worker", "_copier"}, "tests/test_job_quota.py": {"_request"}}


def _sources(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.py"))


def _sdk_private_members() -> set[str]:
    """Every ``_name`` the SDK's client classes define or assign on ``self``."""
    names: set[str] = set()
    for path in _sources(PACKAGE / "client"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef) and sub.name.startswith("_") \
                            and not sub.name.startswith("__"):
                        names.add(sub.name)
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self"
                            and sub.attr.startswith("_") and not sub.attr.startswith("__")):
                        names.add(sub.attr)
    return names


def test_the_scan_finds_the_sdk_private_members() -> None:
    # guards the test below against scanning nothing
    assert {"_core", "_conn", "_slots"} <= _sdk_private_members()


def test_no_private_sdk_member_is_used_outside_the_client_package() -> None:
    private = _sdk_private_members()
    offenders = []
    for path in _sources(PACKAGE, ROOT / "tests", ROOT / "examples"):
        if (PACKAGE / "client") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            # ``self._x`` inside a module's own classes is that class's business, not the SDK's
            if (isinstance(node, ast.Attribute) and node.attr in private
                    and not (isinstance(node.value, ast.Name) and node.value.id == "self")
                    and node.attr not in ALLOWED.get(str(path.relative_to(ROOT)), ())):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ClassDef) and any(
                    isinstance(b, ast.Name) and b.id in SDK_CLASSES for b in node.bases):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} subclasses the SDK ({node.name})")
    assert offenders == []


def _imports(path: Path) -> set[str]:
    """Absolute names of the ``autosaved`` modules ``path`` imports."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return {n for n in out if n.startswith("autosaved")}


def test_daemon_and_storage_stay_out_of_the_sdk_and_the_benchmarks() -> None:
    rules = {"daemon": ("autosaved.bench", "autosaved.client", "autosaved.cli"),
             "storage": ("autosaved.bench", "autosaved.client", "autosaved.cli", "autosaved.daemon",
                         "autosaved.protocol", "autosaved.testing")}
    broken = []
    for area, banned in rules.items():
        for path in _sources(PACKAGE / area):
            for name in _imports(path):
                if name.startswith(banned):
                    broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert broken == []
    assert "autosaved.names" in _imports(PACKAGE / "storage" / "local.py")  # the scan resolves relative imports


# What changes the disk. In storage, only the seam (fileops.py) may call these; an os.open must be a read.
_DURABLE_OS = {"write", "pwrite", "writev", "fsync", "fdatasync", "ftruncate", "truncate", "replace", "rename",
               "unlink", "remove", "mkdir", "makedirs", "rmdir"}
_DURABLE_METHODS = {"unlink", "mkdir", "rename", "write_bytes", "write_text", "touch", "rmtree",
                    "truncate"}


def _durable_calls(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, owner = node.func.attr, node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        if owner_name == "fileops":
            continue
        if owner_name == "os" and name == "open":
            if not any(isinstance(n, ast.Attribute) and n.attr == "O_RDONLY" for n in ast.walk(node)):
                out.append(f"{path.name}:{node.lineno} os.open for writing")
        elif (owner_name == "os" and name in _DURABLE_OS) or (owner_name != "os" and name in _DURABLE_METHODS) \
                or (owner_name == "aiofiles" and name == "open"
                    and any(isinstance(a, ast.Constant) and "w" in str(a.value) for a in node.args[1:])):
            out.append(f"{path.name}:{node.lineno} {owner_name}.{name}")
    return out


def test_every_durable_file_operation_of_storage_goes_through_the_seam() -> None:
    """Issue 19: the power-loss recorder and the fault injector see what they claim only if the storage
    layer changes the disk through ``storage/fileops.py`` alone (the log's open and truncate, the bucket
    seed's chunk files included)."""
    found = [c for p in _sources(PACKAGE / "storage") if p.name not in ("fileops.py", "faults.py")
             for c in _durable_calls(p)]
    assert found == []
    assert _durable_calls(PACKAGE / "storage" / "fileops.py")  # the scan sees such calls where they are


def test_the_readme_code_map_matches_the_tree() -> None:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for row in (r for r in section.splitlines() if r.startswith("| `")):
        paths = re.findall(r"`([a-z_/]+(?:\.py|/))`", row)
        folder = re.match(r"\| `([a-z]+/)` \|", row)
        # a folder's row names its modules bare (``bench/``: ``cli.py``, ...)
        named |= {folder.group(1) + p if folder and "/" not in p else p for p in paths}
    for path in named:
        assert (PACKAGE / path).exists(), f"the code map names {path}, which does not exist"
    for path in _sources(PACKAGE):
        rel = str(path.relative_to(PACKAGE))
        if path.name in ("__init__.py", "__main__.py") and rel != "__init__.py":
            continue
        if rel.startswith("cli/"):
            continue  # one module per subcommand: the map names the rule, not each command
        assert rel in named, f"{rel} is missing from the README's code map"


def _daemon_references(source: str) -> list[int]:
    """Lines of ``source`` that name the ``Daemon`` class: an import, an annotation (quoted too), a use."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if ((isinstance(node, ast.Name) and node.id == "Daemon")
                or (isinstance(node, ast.alias) and node.name == "Daemon")
                or (isinstance(node, ast.Attribute) and node.attr == "Daemon")
                or (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and re.fullmatch(r"\s*Daemon\s*(\|.*)?", node.value))):
            lines.append(getattr(node, "lineno", 0))
    return lines


def test_the_daemon_scan_sees_every_kind_of_reference() -> None:
    # guards the test below against a scan that matches nothing
    src = ("from .app import Daemon\nimport autosaved.daemon.app as a\n"
           "def f(d: 'Daemon', e: a.Daemon) -> None:\n    Daemon()\n")
    assert sorted(set(_daemon_references(src))) == [1, 3, 4]
    assert _daemon_references("from .bench.private import PrivateDaemon\nx = 'a Daemon'\n") == []


def test_no_daemon_helper_sees_the_daemon() -> None:
    """Helpers get a narrow context (the callables and values they need), never the ``Daemon``: only
    daemon/app.py, which builds those contexts, may name the class."""
    offenders = [f"{path.relative_to(ROOT)}:{line}"
                 for path in _sources(PACKAGE / "daemon") if path.name != "app.py"
                 for line in _daemon_references(path.read_text())]
    assert offenders == []


# Issue 23: daemon/app.py wires the helpers together and owns the lifecycle; the work lives in the helpers.
MAX_APP_LINES = 350


def test_the_daemon_core_stays_a_wiring_of_helpers() -> None:
    """New daemon logic goes into a helper module with a narrow context (rpcserver.py, scheduler.py,
    paths.py, ...), not into ``Daemon``: daemon/app.py stays within a line bound."""
    lines = len((PACKAGE / "daemon" / "app.py").read_text().splitlines())
    assert lines <= MAX_APP_LINES, (f"daemon/app.py has {lines} lines, over the bound of {MAX_APP_LINES}: move "
                                    "the new logic into a helper that gets a narrow context")


def _import_graph() -> Any:
    """scripts/import_graph.py, the one statement of the layers (a script, so the closing notes can run it)."""
    spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_point_down() -> None:
    """Each part (subpackage or top-level module) imports only its own layer or below (the LAYERS of
    scripts/import_graph.py): settings, fmt and policy are leaves, config does not load storage, testing
    does not import bench, bench does not import cli. Lazy imports count; TYPE_CHECKING ones do not."""
    graph = _import_graph()
    edges = graph.edges()
    # guards against a scan that sees nothing: known downward edges are found
    assert {("daemon", "storage"), ("cli", "bench"), ("bench", "testing"), ("policy", "settings")} <= set(edges)
    parts = {graph.part_of(graph.module_name(p)) for p in _sources(PACKAGE)}
    assert parts - set(graph.RANK) == set(), "a new part needs a layer in scripts/import_graph.py"
    assert [f"{s} -> {d}: {graph.offenders(s, d)}" for s, d in graph.upward(edges)] == []


def test_import_autosaved_loads_neither_storage_nor_its_codecs() -> None:
    """A trainer's ``import autosaved`` stays light: no storage layer, no zstandard, no obstore."""
    code = ("import sys, autosaved\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('zstandard', 'obstore')"
            " or m.startswith(('autosaved.storage', 'autosaved.daemon'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_op_table_is_declared_once() -> None:
    """protocol.OP_TABLE is the one list of ops with their facts (who may call, which are long): the
    daemon binds handlers to it and the client derives its timeouts from it, never re-declaring either."""
    from autosaved.daemon.rpc import REGISTRY
    from autosaved.protocol import OP_TABLE

    assert set(REGISTRY) == set(OP_TABLE) and all(REGISTRY[n].spec is OP_TABLE[n] for n in OP_TABLE)
    offenders = []
    for path in _sources(PACKAGE, ROOT / "tests"):
        if path == PACKAGE / "protocol.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ClassDef) and node.name in ("Access", "OpSpec"):
                offenders.append(f"{where} declares {node.name}")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in ("OPS", "OP_TABLE")
                                                    for t in node.targets):
                offenders.append(f"{where} assigns an op list")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "request"
                    and any(k.arg == "long" for k in node.keywords)):
                offenders.append(f"{where} says by hand whether a request is long")
    assert offenders == []


SKIPS = '''
import pytest

pytest.importorskip("a_module_that_is_not_installed")
'''
SKIP_ONE = '''
import pytest

def test_needs_a_tool() -> None:
    pytest.skip("the tool is not installed")

def test_runs() -> None:
    pass
'''


@pytest.mark.parametrize("ci", [{}, {"CI": "true"}], ids=["dev", "ci"])
def test_a_skip_fails_the_run_under_ci(tmp_path: Path, ci: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing dependency skips a test (or a whole module) on a developer's machine, and fails under CI
    (CI=true, or AUTOSAVED_REQUIRE_ROOT_TESTS=1 as .ci/run exports)."""
    from tests.ci_skips import require_every_test

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("AUTOSAVED_REQUIRE_ROOT_TESTS", "1")
    assert require_every_test()
    monkeypatch.setenv("AUTOSAVED_REQUIRE_ROOT_TESTS", "0")
    assert not require_every_test()
    (tmp_path / "test_whole_module.py").write_text(SKIPS)
    (tmp_path / "test_one.py").write_text(SKIP_ONE)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "AUTOSAVED_REQUIRE_ROOT_TESTS")}
    args = ["-q", "-p", "no:xdist", "-p", "tests.ci_skips", "-p", "no:cacheprovider", "--continue-on-collection-errors",
            "--rootdir", str(tmp_path), str(tmp_path)]
    out = subprocess.run([sys.executable, "-m", "pytest", *args], capture_output=True, text=True, cwd=ROOT,
                         env={**env, **ci}, timeout=120)
    summary = out.stdout.strip().splitlines()[-1]
    if ci:
        assert out.returncode == 1 and "1 failed, 1 passed, 1 error" in summary, out.stdout
        assert "skipped under CI" in out.stdout and "a_module_that_is_not_installed" in out.stdout
    else:
        assert out.returncode == 0 and "1 passed, 2 skipped" in summary, out.stdout
