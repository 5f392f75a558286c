"""The throttle benchmark runs end to end (tiny size, one round); speed is judged by the benchmark itself."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_throttle_small_run_reports_every_key() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "autosaved", "bench", "throttle", "--size", "16MiB", "--rounds", "1",
         "--window", "0.5s", "--warmup", "0.3s", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("fg_alone_mbps", "fg_unthrottled_mbps", "fg_throttled_mbps"):
        assert report[key] > 0, key
    assert set(report["fg_p99_latency_ms"]) == {"alone", "unthrottled", "throttled"}
    assert report["save_unthrottled_s"] > 0 and report["save_throttled_s"] > 0  # both saves completed
    assert all(len(report["rounds"][c]) == 1 for c in ("alone", "unthrottled", "throttled"))
    assert report["config"]["throttled_daemon_end_status"]["enabled"] is True


def test_window_stats_count_partial_operations() -> None:
    from autosaved.bench.throttle import window_stats

    ops = [(1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]  # three 1 s operations back to back, 1 MB each
    whole = window_stats(ops, 0.0, 3.0, 1_000_000)
    assert whole["mbps"] == 1.0 and whole["ops"] == 3 and whole["p99_ms"] == 1000.0
    short = window_stats(ops, 1.25, 1.5, 1_000_000)  # inside one operation: a quarter of it
    assert short["mbps"] == 1.0 and short["ops"] == 1
