"""``autosaved bench small`` runs end to end (few updates, short windows); speed is judged by the benchmark
itself, never here."""

from __future__ import annotations

import json
import subprocess
import sys

from autosaved.bench.small import KEYS, pct, small_delta


def test_bench_small_reports_every_key() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "autosaved", "bench", "small", "--count", "40", "--seconds", "0.3", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in (*KEYS, "async_rtt_s", "loop_rtt_s", "sync_echo_s", "logged_p50_over_sync_echo"):
        assert report[key] > 0, key
    assert report["accepted_p99_s"] >= report["accepted_p50_s"]
    assert report["logged_p99_s"] >= report["logged_p50_s"]
    # Every logged update became a record of the write-ahead log; a group commit syncs one or more.
    logged = 50 + 200 + 20 * (1 + report["clients"])  # warm-up + measured (at least 200) + clients' warm-up
    assert report["wal_records"] >= logged
    assert 0 < report["wal_syncs"] <= report["wal_records"]
    assert report["clients"] == 8


def test_pct_is_nearest_rank() -> None:
    samples = [float(i) for i in range(101)]
    assert pct(samples, 0.5) == 50.0 and pct(samples, 0.99) == 99.0 and pct(samples, 0.0) == 0.0
    assert pct([3.0], 0.99) == 3.0


def test_small_delta_is_small_and_changes() -> None:
    import msgpack

    assert 150 <= len(msgpack.packb(small_delta(7))) <= 300
    assert small_delta(1) != small_delta(2)
