"""The adaptive throttle end to end, and the throttle benchmark's report (its speed figures are judged
by the benchmark on an idle host; here only what it guarantees on any host)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import autosaved
from autosaved.bench.throttle import Workload
from autosaved.testing.private import PrivateDaemon

from .conftest import skip_or_fail, wait_for

MiB = 1024 * 1024


def test_bench_throttle_small_run_reports_what_it_measured() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "autosaved", "bench", "throttle", "--size", "16MiB", "--rounds", "1",
         "--window", "0.5s", "--warmup", "0.3s", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rounds = report["rounds"]
    assert all(len(rounds[c]) == 1 for c in ("alone", "unthrottled", "throttled", "waited", "raw"))
    for cond in ("alone", "unthrottled", "throttled", "waited", "raw"):
        (r,) = rounds[cond]
        # A busy host may start the workload late, so a short window can hold no operation at all: zero
        # throughput is then the truth. What always holds: the figures are the rounds' own, and consistent.
        assert r["mbps"] >= 0 and r["ops"] >= 0 and (r["mbps"] > 0) == (r["ops"] > 0), (cond, r)
        assert report[f"fg_{cond}_mbps"] == round(statistics.median([r["mbps"]]), 3)
        p99 = report["fg_p99_latency_ms"][cond]
        assert (math.isnan(p99) and r["ops"] == 0) or p99 == round(r["p99_ms"], 3)
    assert rounds["alone"][0]["s"] >= 0.5  # the alone window is what was asked for
    # every save completed (each span is its save's duration)
    for cond in ("unthrottled", "throttled", "waited", "raw"):
        assert report[f"save_{cond}_s"] > 0 and rounds[cond][0]["s"] >= report[f"save_{cond}_s"] - 0.001
    alone = report["fg_alone_mbps"]
    ratios = report["throttled_vs_alone"]
    if alone:
        assert ratios["mbps"] == round(report["fg_throttled_mbps"] / alone, 3)
    assert report["target_met"] == bool(ratios["mbps"] is not None and ratios["mbps"] >= 0.85
                                        and ratios["p99"] is not None and ratios["p99"] <= 1.5)
    assert report["config"]["throttled_daemon_end_status"]["enabled"] is True
    # the waited-for save beside a raw write of the same bytes; the throttled daemon ran both kinds of save
    assert report["waited_vs_raw"] == round(report["save_waited_s"] / report["save_raw_s"], 3)
    assert report["config"]["throttled_daemon_end_status"]["urgent_saves"] >= 1


def test_window_stats_count_partial_operations() -> None:
    from autosaved.bench.throttle import window_stats

    ops = [(1.0, 1.0), (2.0, 1.0), (3.0, 1.0)]  # three 1 s operations back to back, 1 MB each
    whole = window_stats(ops, 0.0, 3.0, 1_000_000)
    assert whole["mbps"] == 1.0 and whole["ops"] == 3 and whole["p99_ms"] == 1000.0
    short = window_stats(ops, 1.25, 1.5, 1_000_000)  # inside one operation: a quarter of it
    assert short["mbps"] == 1.0 and short["ops"] == 1


def _throttle(c: autosaved.Client) -> dict[str, Any]:
    with autosaved.Admin(address=c.address, timeout=60.0) as admin:
        status: dict[str, Any] = admin.status()["daemon"]["throttle"]
    return status


def _timed_save(c: autosaved.Client, x: np.ndarray) -> tuple[float, float]:
    """A background save of ``x`` (the job's dirty_bytes rule; a save someone waits for is not throttled):
    (seconds, seconds of it the throttle held the writes back)."""
    with autosaved.Admin(address=c.address, timeout=60.0) as admin:
        jobs = {j["job"]: j for j in admin.status()["jobs"]}
        latest = jobs[c.job]["latest_version"] if c.job in jobs else None
        before = admin.status()["daemon"]["throttle"]["throttled_s"]
        started = time.monotonic()
        c.update({"x": x})
        wait_for(lambda: admin.status(c.job)["latest_version"] != latest, timeout=300, interval=0.01)
        return time.monotonic() - started, admin.status()["daemon"]["throttle"]["throttled_s"] - before


def test_adaptive_throttle_slows_a_save_under_real_foreground_io(make_daemon: Callable[..., PrivateDaemon],
                                                                 tmp_path: Path,
                                                                 figure: Callable[[str], None]) -> None:
    """A real fsync-heavy foreground writer on the state dir's disk: the daemon's sampler sees it, the
    allowed rate falls to the floor, and a background save made meanwhile is held back by the throttle for most of
    its time; once the writer stops the rate opens again. Direction, within one run, not speed."""
    d = make_daemon('[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "1MiB"\nmin_gap = "0s"\n'
                    'compression = "off"\n[throttle]\nsample_interval = "100ms"\nmin_write_rate = "1MiB"\n')
    rng = np.random.default_rng(0)
    with autosaved.Client("fg", address=d.address, timeout=120, save_timeout=600) as c:
        if not _throttle(c)["disks"]:
            skip_or_fail("no block device found under the state dir: the throttle has no disk to sample")
        workload = Workload(tmp_path, "write")  # appends 256 KiB and fdatasyncs, as fast as it can
        workload.start()
        try:
            # the sampler sees the writer: the allowed rate falls (halving) towards its 1 MiB/s floor
            wait_for(lambda: (_throttle(c)["allowed_rate"] or math.inf) <= 4 * MiB, timeout=120)
            busy_s, busy_held = _timed_save(c, rng.integers(0, 2**62, 4 * MiB // 8))
        finally:
            ops = workload.stop()
        assert ops, "the foreground writer never completed a write"
        # 4 MiB at a rate of at most 4 MiB/s, and falling: held back for a good part of the save
        assert busy_held >= 0.25, (busy_s, busy_held)
        # the writer stopped: the rate opens again (additive recovery), and the same save is held less
        wait_for(lambda: (_throttle(c)["allowed_rate"] or math.inf) > 16 * MiB, timeout=120)
        idle_s, idle_held = _timed_save(c, rng.integers(0, 2**62, 4 * MiB // 8))
    figure(f"save under foreground writes {busy_s:.2f}s (held {busy_held:.2f}s); after {idle_s:.2f}s "
          f"(held {idle_held:.2f}s)")
    assert idle_held < busy_held
