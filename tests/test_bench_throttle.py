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
