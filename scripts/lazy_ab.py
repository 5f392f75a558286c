"""``bench train``'s harness with only the modes none, eager and lazy, and the LazyClient of this tree or of
an earlier git revision (issue 21: the lazy client before and after a change, back to back on one host).

    python scripts/lazy_ab.py --steps 3                 # this tree's LazyClient
    python scripts/lazy_ab.py --steps 3 --rev af8ff3b   # client/lazy.py and lazyplan.py as of af8ff3b

Prints one JSON line: ``bench train``'s keys for the three modes, the ratios, the lazy-minus-eager CPU
seconds per step and the load average. Run both alternately; the host's load swings step times 2-4x.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def old_client(rev: str, into: Path) -> type:
    """The LazyClient of ``rev``: its client/lazy.py and lazyplan.py as modules of their own, importing the rest
    of this tree."""
    for name in ("lazy", "lazyplan"):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:autosaved/client/{name}.py"],
                              check=True, capture_output=True, text=True).stdout
        text = text.replace("from .lazyplan import", "from old_lazyplan import")
        text = text.replace("from ..", "from autosaved.").replace("from .", "from autosaved.client.")
        (into / f"old_{name}.py").write_text(text)
    sys.path.insert(0, str(into))
    from old_lazy import LazyClient  # type: ignore[import-not-found]

    return LazyClient  # type: ignore[no-any-return]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rev", help="take the LazyClient from this git revision (default: this tree's)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--small", action="store_true")
    a = p.parse_args()
    import autosaved.bench.train as train

    with tempfile.TemporaryDirectory(prefix="lazy-ab-") as tmp:
        if a.rev:
            train.LazyClient = old_client(a.rev, Path(tmp))  # type: ignore[misc]
        train.MODES = ("none", "eager", "lazy")  # type: ignore[misc]
        r = train.measure(train.TINY if a.small else train.GPT2_SMALL, a.steps, 64, 2, Path(tmp), 2)
    out = {"lazy_client": a.rev or "tree", "load": [round(x, 2) for x in os.getloadavg()]}
    out.update({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()
                if k.split("_")[0] in ("step", "cpu", "minflt", "blocking", "alone", "daemon", "copy", "background")})
    out["lazy/none"] = round(r["step_s_lazy"] / r["step_s_none"], 3)
    out["eager/none"] = round(r["step_s_eager"] / r["step_s_none"], 3)
    out["lazy/eager"] = round(r["step_s_lazy"] / r["step_s_eager"], 3)
    out["cpu_lazy_minus_eager"] = round(r["cpu_s_lazy"] - r["cpu_s_eager"], 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
