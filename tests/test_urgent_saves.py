"""A save someone waits for runs at full speed (issue 21, item 3): under a real foreground writer that
makes the adaptive throttle hold background saves at its floor, an explicit ``save()`` and a
``wait="committed"`` update are not paced by the background bucket, and a background save already
writing is promoted when a client starts waiting for it. Structure, read from the daemon's own status
and log lines, never the host's speed."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import autosaved
from autosaved.bench.throttle import Workload
from autosaved.testing.private import PrivateDaemon

from .conftest import skip_or_fail, wait_for

MiB = 1024 * 1024
# Background saves come from the dirty_bytes rule, which only the jobs that want them turn on.
BACKGROUND = {"dirty_bytes": "1MiB"}
CONFIG = ('[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\ncompression = "off"\n'
          '[throttle]\nsample_interval = "100ms"\nmin_write_rate = "1MiB"\n')


def _status(d: PrivateDaemon, job: str | None = None) -> dict[str, Any]:
    with autosaved.Admin(address=d.address, timeout=60.0) as admin:
        return admin.status(job)


def _throttle(d: PrivateDaemon) -> dict[str, Any]:
    throttle: dict[str, Any] = _status(d)["daemon"]["throttle"]
    return throttle


def _saved_line(d: PrivateDaemon, job: str, version: int) -> str:
    for line in d.log().splitlines():
        if re.search(rf"saved job={job} owner=\d+ version={version} ", line):
            return line
    raise AssertionError(f"no 'saved' line for {job} v{version}:\n{d.log()[-3000:]}")


def test_waited_for_saves_are_not_paced_by_the_background_throttle(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    d = make_daemon(CONFIG)
    if not _throttle(d)["disks"]:
        skip_or_fail("no block device found under the state dir: the throttle has no disk to sample")
    rng = np.random.default_rng(0)
    workload = Workload(tmp_path, "write")  # appends 256 KiB and fdatasyncs, as fast as it can
    workload.start()
    try:
        wait_for(lambda: (_throttle(d)["allowed_rate"] or math.inf) <= 4 * MiB, timeout=120)
        with autosaved.Client("bg", address=d.address, timeout=120, save_timeout=600, policy=BACKGROUND) as bg:
            # A background save (the dirty_bytes rule) under the same traffic is held back: the condition is real.
            before = _throttle(d)["throttled_s"]
            bg.update({"x": rng.integers(0, 2**62, 4 * MiB // 8)})
            wait_for(lambda: _status(d, "bg")["latest_version"] is not None, timeout=300)
            background_held = _throttle(d)["throttled_s"] - before
            assert background_held > 0, background_held
            assert "pace=background" in _saved_line(d, "bg", _status(d, "bg")["latest_version"])
        with autosaved.Client("fg", address=d.address, timeout=120, save_timeout=600) as fg:
            # An explicit save and a committed-wait update, each of the same size: never held back.
            fg.update({"x": rng.integers(0, 2**62, 4 * MiB // 8)}, wait="accepted")
            before = _throttle(d)["throttled_s"]
            saved = fg.save()
            committed = fg.update({"x": rng.integers(0, 2**62, 4 * MiB // 8)}, wait="committed")
            after = _throttle(d)
        # Only these two saves ran meanwhile: the bucket never held anything back.
        assert after["throttled_s"] == before, (before, after)
        assert (after["allowed_rate"] or math.inf) <= 64 * MiB  # the traffic was still there
        for version in (saved, committed.version):
            assert version is not None
            line = _saved_line(d, "fg", version)
            assert "pace=urgent throttled_ms=0" in line, line
        assert after["urgent_saves"] >= 2
    finally:
        assert workload.stop(), "the foreground writer never completed a write"


def test_a_background_save_is_promoted_when_a_client_starts_waiting(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    d = make_daemon(CONFIG)
    if not _throttle(d)["disks"]:
        skip_or_fail("no block device found under the state dir: the throttle has no disk to sample")
    rng = np.random.default_rng(1)
    workload = Workload(tmp_path, "write")
    workload.start()
    try:
        wait_for(lambda: (_throttle(d)["allowed_rate"] or math.inf) <= 4 * MiB, timeout=120)
        with autosaved.Client("job", address=d.address, timeout=120, save_timeout=600,
                              policy=BACKGROUND) as c:
            before = _throttle(d)["throttled_s"]
            # 32 MiB under a rate of at most 4 MiB/s: a background save that is held back for seconds.
            c.update({"x": rng.integers(0, 2**62, 32 * MiB // 8)})
            wait_for(lambda: _status(d, "job")["saving"] and _throttle(d)["throttled_s"] > before + 0.2,
                     timeout=120)
            version = c.save()  # waits for the save in flight (and nothing else is dirty)
        assert version is not None
        line = _saved_line(d, "job", version)
        # Held before the promotion, never after it (the bucket reads the flag under its lock at each tick).
        assert "pace=promoted" in line and "throttled_after_promotion_ms=0" in line, line
        assert int(re.search(r"throttled_ms=(\d+)", line).group(1)) > 0, line  # type: ignore[union-attr]
        assert f"promoted save job=job version={version}" in d.log()
        assert _throttle(d)["promoted_saves"] == 1
    finally:
        assert workload.stop(), "the foreground writer never completed a write"
