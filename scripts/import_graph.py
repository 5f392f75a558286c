"""The import graph between autosaved's parts, and the imports that point up.

    python scripts/import_graph.py            # edges "src -> dst (n)" and the upward ones, flagged
    python scripts/import_graph.py --check    # exit 1 if an import points up (tests/test_layout.py runs this)

A part is a subpackage (``daemon``, ``storage``, ...) or a top-level module (``config``, ``policy``, ...).
Each part has a layer in :data:`LAYERS`; a part may import parts of its own layer or below, never above.
Imports inside functions count too (a lazy import is still a dependency); ``if TYPE_CHECKING:`` imports
do not (they never run). Within-part imports are not edges.
"""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "autosaved"

# Lowest first. Leaves know nothing of the rest; the entry points (cli, bench, the package's __init__)
# sit on top. Parts on one line are peers and may import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "names", "settings", "fmt", "backoff", "logfmt"),
    ("protocol", "codec", "tree", "state", "shm", "deadline", "throttle", "policy", "seaweed", "fairqueue"),
    ("config",),  # reads the TOML; must not load the storage layer (and with it zstandard, obstore)
    ("storage",),
    ("offline", "remote_offline"),
    ("client",),
    ("__init__",),  # the public API: the client, the errors, offline restore (and __version__)
    ("daemon", "integrations"),
    ("testing",),
    ("bench",),
    ("cli",),
    ("__main__",),
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
# Upward edges that are deliberate, with the reason.
ALLOWED: dict[tuple[str, str], str] = {
    ("storage", "testing"): "storage.fsutil installs the power-loss recorder (testing.fstrace) only when "
                            "AUTOSAVED_FSTRACE is set, before the storage code's first call",
}


def part_of(module: str) -> str:
    """``autosaved.daemon.app`` -> ``daemon``; ``autosaved.config`` -> ``config``; ``autosaved`` -> ``__init__``."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def imports_of(path: Path) -> list[str]:
    """Every autosaved module ``path`` imports (absolute names)."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    out: list[str] = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "autosaved"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "autosaved":
                continue
            if node.module is None or target == "autosaved":  # from . import x: x may be a module
                for alias in node.names:
                    sub = ROOT.parent.joinpath(*target.split("."), alias.name)
                    is_module = sub.is_dir() or sub.with_suffix(".py").exists()
                    out.append(f"{target}.{alias.name}" if is_module else target)
            else:
                out.append(target)
    return out


def edges() -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for path in sorted(ROOT.rglob("*.py")):
        src = part_of(module_name(path))
        if path.parent == ROOT and path.stem == "__init__":
            src = "__init__"
        for target in imports_of(path):
            dst = part_of(target)
            if dst != src:
                counts[(src, dst)] += 1
    return counts


def upward(counts: Counter[tuple[str, str]]) -> list[tuple[str, str]]:
    """Edges whose target sits on a higher layer than their source (an unknown part counts as upward)."""
    return [(s, d) for (s, d) in counts
            if RANK.get(d, len(LAYERS)) > RANK.get(s, -1) and (s, d) not in ALLOWED]


def offenders(src: str, dst: str) -> list[str]:
    """The files in ``src`` that import ``dst`` (to say where an upward edge comes from)."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        mine = part_of(name) == src or (src == "__init__" and name == "autosaved")
        if mine and any(part_of(t) == dst for t in imports_of(path)):
            out.append(str(path.relative_to(ROOT.parent)))
    return out


def main() -> int:
    counts = edges()
    up = set(upward(counts))
    for (src, dst), n in sorted(counts.items(), key=lambda e: (RANK.get(e[0][0], 99), e[0])):
        flag = "   <-- UPWARD (" + ", ".join(offenders(src, dst)) + ")" if (src, dst) in up else ""
        if (src, dst) in ALLOWED:
            flag = f"   (allowed upward: {ALLOWED[(src, dst)]})"
        print(f"{src} -> {dst} ({n}){flag}")
    print(f"{len(counts)} edges, {len(up)} upward")
    return 1 if up and "--check" in sys.argv else 0


if __name__ == "__main__":
    sys.exit(main())
