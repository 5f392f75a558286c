"""``autosaved bench jobs`` runs end to end (a few jobs, short windows); speed is judged by the benchmark
itself, never here."""

from __future__ import annotations

import json
import subprocess
import sys

from autosaved.bench.jobs import KEYS


def test_bench_jobs_reports_every_key() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "autosaved", "bench", "jobs", "--jobs", "20", "--procs", "2", "--seconds", "0.5",
         "--interval", "0.05", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in KEYS:
        assert report[key] > 0, key
    assert report["jobs"] == 20
    assert report["jobs_p99_s"] >= report["jobs_p50_s"] and report["single_p99_s"] >= report["single_p50_s"]
