"""The deadline planner with the object store (pure): a job fits only when its save and its upload end
in time; the fitting set runs in Johnson's order, the shortest two-stage (disk, then link) schedule."""

from __future__ import annotations

import itertools
import random

import pytest

from autosaved import deadline
from autosaved.deadline import Pending, johnson_order, pipeline_end, plan_flush

MiB = 1024 * 1024


def test_without_an_upload_rate_the_plan_is_the_local_one() -> None:
    pending = [Pending("big", 100 * MiB, upload_bytes=100 * MiB), Pending("small", MiB, upload_bytes=MiB)]
    plan = plan_flush(pending, 1000 * MiB, 5.0)
    assert plan.fits == {"big", "small"} and plan.order == ("small", "big") and plan.upload_s == {}


def test_a_job_whose_upload_cannot_end_in_time_does_not_fit() -> None:
    pending = [Pending("big", 100 * MiB, upload_bytes=100 * MiB), Pending("small", 10 * MiB, upload_bytes=10 * MiB)]
    # The disk writes both in 0.2 s; the link needs 10 s for the big one and 1 s for the small one.
    plan = plan_flush(pending, 1000 * MiB, 5.0, upload_rate=10 * MiB)
    assert plan.fits == {"small"} and plan.order == ("small", "big")
    assert plan.upload_s["big"] == pytest.approx(10.1) and plan.estimate_s["big"] == pytest.approx(0.15)


def test_a_backlog_counts_its_own_job_and_other_jobs_uploads_occupy_the_link_first() -> None:
    # "a" wrote little since its last version, but 40 MiB of its older versions are not up yet.
    pending = [Pending("a", MiB, upload_bytes=41 * MiB), Pending("b", 5 * MiB, upload_bytes=5 * MiB)]
    plan = plan_flush(pending, 1000 * MiB, 3.0, upload_rate=10 * MiB)
    assert plan.fits == {"b"}
    # Other jobs' backlog (nothing to save, 2.5 s to upload) leaves too little for b as well.
    assert plan_flush(pending, 1000 * MiB, 3.0, upload_rate=10 * MiB, upload_busy_s=2.5).fits == frozenset()


def test_johnson_order_is_the_shortest_two_stage_schedule() -> None:
    rng = random.Random(7)
    for _ in range(200):
        keys = list(range(rng.randint(1, 6)))
        write = {k: rng.uniform(0.01, 3.0) for k in keys}
        upload = {k: rng.uniform(0.01, 3.0) for k in keys}
        busy = rng.choice([0.0, rng.uniform(0, 2)])
        best = min(pipeline_end(p, write, upload, busy) for p in itertools.permutations(keys))
        assert pipeline_end(johnson_order(keys, write, upload), write, upload, busy) == pytest.approx(best)


def test_the_fitting_set_runs_in_johnson_order_and_ends_within_the_deadline() -> None:
    # Upload-heavy jobs first (by write time), write-heavy ones last (by upload time, descending).
    pending = [Pending("w-heavy", 300 * MiB, upload_bytes=10 * MiB),
               Pending("u-heavy", 10 * MiB, upload_bytes=200 * MiB),
               Pending("even", 100 * MiB, upload_bytes=100 * MiB)]
    plan = plan_flush(pending, 100 * MiB, 60.0, upload_rate=100 * MiB)
    assert plan.fits == {"w-heavy", "u-heavy", "even"}
    assert plan.order == ("u-heavy", "even", "w-heavy")
    assert pipeline_end(plan.order, plan.estimate_s, plan.upload_s) <= 60.0


def test_many_jobs_use_the_serial_bound_which_is_never_optimistic(monkeypatch: pytest.MonkeyPatch) -> None:
    pending = [Pending(i, 10 * MiB, upload_bytes=10 * MiB) for i in range(6)]
    exact = plan_flush(pending, 100 * MiB, 1.5, upload_rate=100 * MiB)
    monkeypatch.setattr(deadline, "EXACT_LIMIT", 3)
    serial = plan_flush(pending, 100 * MiB, 1.5, upload_rate=100 * MiB)
    assert serial.fits <= exact.fits and len(serial.fits) < len(exact.fits)
