"""Recovery time is bounded (issue 19, defect 11): the log past the newest version has its own bound
(``policy.log_bytes``, ``policy.replay_time``), whatever ``dirty_bytes`` is; a replayed job is saved at
once (reason ``recovery``); a long load never makes a ``hello`` fail."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

import autosaved
from autosaved.storage.local import JobStore
from autosaved.testing.private import PrivateDaemon

from .conftest import fault_fired, wait_for

# The crash loop, short: interval and idle that a busy stream never reaches, dirty_bytes off
# (as good as "auto" on a big host), and a 1 MiB log bound that a few 64 KiB records pass.
LOOP_POLICY = ('[policy]\ninterval = "10min"\nidle = "10min"\ndirty_bytes = "off"\nmin_gap = "10min"\n'
               'log_bytes = "1MiB"\nreplay_time = "off"\n')
RECORD = 64 * 1024
BOUND = 1024 * 1024


def _log_bytes(d: PrivateDaemon, job: str) -> int:
    log = d.state_dir / "jobs" / str(os.geteuid()) / job / "log"
    return sum(p.stat().st_size for p in log.glob("*.wal")) if log.is_dir() else 0


def _versions(d: PrivateDaemon, job: str) -> list[int]:
    return JobStore(d.state_dir, os.geteuid(), job).version_ids()


def test_crash_loop_commits_a_version_and_keeps_the_log_bounded(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """A stream of logged 64 KiB records, the daemon SIGKILLed right after each restart's first ack,
    three times: each restart saves the replayed log as a version (reason ``recovery``), every round's
    stream past the bound is saved (reason ``log_bytes``) before it is killed, and what the next start
    replays stays under the bound. Before the fix no version was ever committed and the log only grew."""
    d = make_daemon(LOOP_POLICY)
    rng = np.random.default_rng(0)
    n = 0
    for round_ in range(4):
        with autosaved.Client("loop", address=d.address, timeout=30) as c:
            if round_:
                # The hello loaded the job and replayed the last round's tail: a recovery save follows.
                wait_for(lambda r=round_: d.log().count("reason=recovery") >= r, timeout=60)
            for _ in range(2 * BOUND // RECORD):  # twice the bound: the log-size rule must fire
                n += 1
                c.update({"n": n, "w": rng.integers(0, 255, RECORD, dtype=np.uint8)}, wait="logged")
            wait_for(lambda: _log_bytes(d, "loop") < BOUND, timeout=60)
            n += 1
            c.update({"n": n}, wait="logged")  # the first ack of the stream that the kill interrupts
        d.kill()
        assert _log_bytes(d, "loop") < BOUND + RECORD  # what the next start replays
        assert _versions(d, "loop"), "no version was ever committed"
        d.start()
    assert "reason=log_bytes" in d.log()
    with autosaved.Client("loop", address=d.address) as c:
        assert c.restore()["n"] == n


def test_hello_waits_for_a_job_whose_load_is_long(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    """Loading the job takes longer than the client's ordinary timeout (the fault point holds the load for
    3 s, as a long replay would): the hello waits for it within the client's save timeout and succeeds."""
    faults = tmp_path / "faults"
    d = make_daemon(env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("slow", address=d.address) as c:
        c.update({"x": 1}, wait="logged")
    d.kill()
    faults.write_text("load.job.before 1 sleep:3\n")
    d.start()
    with autosaved.Client("slow", address=d.address, timeout=1, save_timeout=60) as c:
        assert c.restore() == {"x": 1}
    fault_fired(faults, "load.job.before")
