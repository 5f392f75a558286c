"""``autosaved bench shapes`` runs end to end (a small other job, few updates); speed is judged by the
benchmark itself, never here."""

from __future__ import annotations

import json
import subprocess
import sys

from autosaved.bench.shapes import KEYS


def test_bench_shapes_reports_every_key() -> None:
    out = subprocess.run([sys.executable, "-m", "autosaved", "bench", "shapes", "--maps", "3000", "--updates", "3",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in KEYS:
        assert report[key] > 0, key
    assert report["maps"] == 3000
