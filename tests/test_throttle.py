"""The pure parts of I/O politeness: controller on recorded traces, token bucket on a fake clock, flush
planning, and the counter readers on fake /sys and /proc trees."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from autosaved.daemon.iosampler import disks_under, read_dirty, read_psi
from autosaved.deadline import Pending, plan_flush
from autosaved.throttle import (
    Controller,
    IoSample,
    Load,
    SaveAborted,
    SavePace,
    ThrottleState,
    TokenBucket,
    initial_state,
    measure,
    step,
)

MiB = 1024 * 1024
DT = 0.5


@dataclass(frozen=True)
class Seg:
    """``seconds`` of steady load, as the counters would record it."""

    seconds: float
    util: float | None = 0.0
    others_mbps: float | None = 0.0
    own_mbps: float = 0.0
    psi_some: float | None = 0.0
    psi_full: float | None = 0.0
    dirty_mib: float | None = 10.0


def record(*segments: Seg) -> list[IoSample]:
    """Cumulative samples every DT seconds, like the sampler takes them."""
    t, busy, dev, own = 100.0, 5000.0, 10**9, 0
    out = [IoSample(t, busy, dev, own, 0.0, 0.0, 10 * MiB)]
    for seg in segments:
        for _ in range(round(seg.seconds / DT)):
            t += DT
            own += int(seg.own_mbps * MiB * DT)
            if seg.util is not None:
                busy += seg.util * DT * 1000
            if seg.others_mbps is not None:
                dev += int((seg.others_mbps + seg.own_mbps) * MiB * DT)
            out.append(IoSample(
                t, busy if seg.util is not None else None, dev if seg.others_mbps is not None else None, own,
                seg.psi_some, seg.psi_full, None if seg.dirty_mib is None else int(seg.dirty_mib * MiB),
            ))
    return out


def replay(ctl: Controller, samples: list[IoSample]) -> list[float]:
    state = initial_state(ctl)
    rates = []
    for prev, cur in itertools.pairwise(samples):
        state = step(ctl, state, measure(prev, cur), cur.at)
        rates.append(state.rate)
    return rates


CTL = Controller(min_write_rate=16 * MiB)
CAPPED = Controller(min_write_rate=16 * MiB, max_write_rate=200 * MiB)
BUSY = Seg(4, util=1.0, others_mbps=150)


def test_idle_disk_stays_open() -> None:
    assert set(replay(CTL, record(Seg(10)))) == {math.inf}
    assert set(replay(CAPPED, record(Seg(10)))) == {200 * MiB}


def test_our_own_traffic_alone_is_no_reason_to_back_off() -> None:
    # The disk is saturated, but by the daemon's own save: nobody else is waiting.
    assert set(replay(CTL, record(Seg(5, util=1.0, others_mbps=0, own_mbps=300)))) == {math.inf}


@pytest.mark.parametrize(
    ("name", "busy"),
    [
        ("others saturate the disk", Seg(4, util=1.0, others_mbps=150)),
        ("others + I/O pressure, counters say little", Seg(4, util=0.1, others_mbps=5, psi_some=40)),
        ("everyone stalls (psi full), no disk counters", Seg(4, util=None, others_mbps=None, psi_full=30)),
        ("dirty page cache piles up", Seg(4, dirty_mib=2048)),
    ],
)
def test_contention_backs_off_to_the_floor_and_not_below(name: str, busy: Seg) -> None:
    rates = replay(CTL, record(busy, busy))
    assert rates[0] < math.inf, name  # the first contended sample already halves
    assert all(b <= a for a, b in itertools.pairwise(rates)), name  # never up while contended
    assert min(rates) == rates[-1] == CTL.min_write_rate, name


def test_pressure_spike_then_recovery() -> None:
    rates = replay(CAPPED, record(Seg(2), Seg(2, util=0.9, others_mbps=80, psi_some=60), Seg(12)))
    calm, spike, after = rates[:4], rates[4:8], rates[8:]
    assert set(calm) == {200 * MiB}
    assert spike[-1] < 50 * MiB
    assert all(b >= a for a, b in itertools.pairwise(after))  # recovers monotonically...
    assert after[1] - after[0] == pytest.approx(CAPPED.recover_per_s * DT)  # ...additively...
    assert after[-1] == 200 * MiB  # ...back to the cap


def test_recovery_opens_to_unlimited_without_a_cap() -> None:
    rates = replay(CTL, record(BUSY, Seg(20)))
    assert rates[-1] == math.inf and min(rates) == CTL.min_write_rate


def test_missing_counters_enforce_only_the_cap() -> None:
    blind = Seg(5, util=None, others_mbps=None, psi_some=None, psi_full=None, dirty_mib=None)
    assert set(replay(CAPPED, record(blind))) == {200 * MiB}
    assert measure(*record(blind)[:2]) == Load()


def test_halving_waits_between_decreases() -> None:
    ctl = Controller(min_write_rate=1 * MiB, max_write_rate=256 * MiB, decrease_every=1.0)
    rates = replay(ctl, record(Seg(3, util=1.0, others_mbps=100)))
    assert rates == [128 * MiB, 128 * MiB, 64 * MiB, 64 * MiB, 32 * MiB, 32 * MiB]


def test_others_bytes_exclude_ours_and_never_go_negative() -> None:
    a = IoSample(0.0, 0.0, 1000 * MiB, own_bytes=0)
    b = IoSample(1.0, 500.0, 1100 * MiB, own_bytes=60 * MiB)
    load = measure(a, b)
    assert load.utilisation == 0.5 and load.others_bps == 40 * MiB
    late_writeback = IoSample(1.0, 500.0, 1000 * MiB, own_bytes=60 * MiB)
    assert measure(a, late_writeback).others_bps == 0.0


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_token_bucket_holds_the_rate_and_counts_throttled_time() -> None:
    ft = FakeTime()
    bucket = TokenBucket(10 * MiB, clock=ft.clock, sleep=ft.sleep)
    for _ in range(50):
        bucket(MiB)
    assert ft.now == pytest.approx(5.0, abs=0.06)  # 50 MiB at 10 MiB/s from an empty bucket
    assert bucket.throttled_s == pytest.approx(ft.now, abs=0.06) and bucket.paced_bytes == 50 * MiB


def test_an_urgent_save_takes_only_the_cap_and_a_promotion_stops_the_holding() -> None:
    ft = FakeTime()
    bucket = TokenBucket(1 * MiB, clock=ft.clock, sleep=ft.sleep)
    urgent = SavePace(bucket, urgent=True)
    for _ in range(100):
        urgent(MiB)
    assert ft.now == 0.0 and urgent.throttled_s == 0.0 and urgent.kind == "urgent"  # the adaptive rate is not its
    bucket.cap = 20 * MiB
    for _ in range(21):
        urgent(MiB)
    assert ft.now == pytest.approx(1.0, abs=0.06)  # the hard cap holds for it too
    background = SavePace(bucket)
    started = ft.now
    for _ in range(3):
        background(MiB)
    assert ft.now - started == pytest.approx(3.0, abs=0.1) and background.throttled_s > 2.5  # 1 MiB/s
    assert background.promote() and not background.promote()
    started = ft.now
    for _ in range(20):
        background(MiB)
    assert ft.now - started <= 1.06 and background.kind == "promoted"  # at the cap from now on
    assert background.throttled_since_promotion == pytest.approx(ft.now - started, abs=0.06)


def test_token_bucket_cap_bypass_and_abort() -> None:
    ft = FakeTime()
    bucket = TokenBucket(1 * MiB, clock=ft.clock, sleep=ft.sleep)
    bucket.bypass = True
    for _ in range(100):
        bucket(MiB)
    assert ft.now == 0.0  # deadline flush: the adaptive rate is off...
    bucket.cap = 20 * MiB
    for _ in range(21):
        bucket(MiB)
    assert ft.now == pytest.approx(1.0, abs=0.06)  # ...but the configured cap holds
    bucket.aborted = True
    with pytest.raises(SaveAborted):
        bucket(MiB)


def test_flush_plan_saves_the_most_state_that_fits() -> None:
    jobs = [Pending("small", 1 * MiB), Pending("big", 90 * MiB), Pending("mid", 40 * MiB), Pending("huge", 500 * MiB)]
    plan = plan_flush(jobs, write_rate=100 * MiB, time_left=1.5)
    # 1.5 s at 100 MiB/s: huge cannot fit; big fits first (most bytes), then mid; small fits the rest.
    assert plan.fits == {"big", "mid", "small"}
    assert plan.order == ("small", "mid", "big", "huge")  # fitting set smallest first, then the rest
    assert plan.estimate_s["huge"] > 1.5
    everything = plan_flush(jobs, write_rate=1000 * MiB, time_left=10)
    assert everything.fits == {"small", "big", "mid", "huge"}
    assert plan_flush([], 1.0, 1.0).order == ()


def test_state_with_rate_below_floor_is_lifted() -> None:
    state = ThrottleState(rate=1.0, updated_at=0.0)
    assert step(CTL, state, Load(), 0.0).rate == CTL.min_write_rate


# -- counter readers on fake /sys and /proc trees -----------------------------------------------------


def _fake_block(sys_root: Path, target: Path, device_rel: str) -> Path:
    st = os.stat(target)
    dev = sys_root / "devices" / device_rel
    dev.mkdir(parents=True)
    link = sys_root / "dev" / "block" / f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(dev)
    return dev


def test_partition_resolves_to_its_disk(tmp_path: Path) -> None:
    part = _fake_block(tmp_path / "sys", tmp_path, "pci0/nvme/nvme0n1/nvme0n1p2")
    (part / "partition").write_text("2\n")
    assert disks_under(tmp_path, tmp_path / "sys") == ["nvme0n1"]


def test_device_mapper_resolves_through_slaves(tmp_path: Path) -> None:
    sys_root = tmp_path / "sys"
    dm = _fake_block(sys_root, tmp_path, "virtual/block/dm-0")
    for disk in ("sda", "sdb"):
        p = sys_root / "devices" / "pci0" / disk / f"{disk}1"
        p.mkdir(parents=True)
        (p / "partition").write_text("1\n")
        (dm / "slaves").mkdir(exist_ok=True)
        (dm / "slaves" / f"{disk}1").symlink_to(p)
    assert disks_under(tmp_path, sys_root) == ["sda", "sdb"]


def test_no_block_device_is_not_an_error(tmp_path: Path) -> None:
    assert disks_under(tmp_path, tmp_path / "empty-sys") == []
    assert disks_under(tmp_path / "missing", tmp_path) == []


def test_psi_and_meminfo_parse_and_degrade(tmp_path: Path) -> None:
    (tmp_path / "pressure").mkdir()
    (tmp_path / "pressure" / "io").write_text(
        "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=4.25 avg60=1.00 avg300=0.50 total=45\n"
    )
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nDirty:        2048 kB\nWriteback:      1024 kB\n")
    assert read_psi(tmp_path) == (12.5, 4.25)
    assert read_dirty(tmp_path) == 3072 * 1024
    empty = tmp_path / "none"
    assert read_psi(empty) == (None, None) and read_dirty(empty) is None


# -- deadline-derived policy and the preemption parsers ------------------------------------------------


def test_dirty_bytes_default_and_warning_follow_speed_and_deadline(tmp_path: Path) -> None:
    from dataclasses import replace

    from autosaved.config import Config, PolicySettings
    from autosaved.daemon.iocontrol import derived_dirty_bytes, policy_warning

    assert derived_dirty_bytes(200 * MiB, 25.0) == 2500 * MiB  # half of what 25 s at 200 MiB/s write
    assert derived_dirty_bytes(1 * MiB, 1.0) == 64 * MiB  # never absurdly small
    cfg = Config(address="ipc:///tmp/x.sock", state_dir=tmp_path, shutdown_deadline=10.0,
                 policy=PolicySettings(dirty_bytes=1024 * MiB))
    assert policy_warning(cfg, 200 * MiB) is None  # 1 GiB in 10 s at 200 MiB/s: fits
    warning = policy_warning(cfg, 50 * MiB)
    assert warning is not None and "policy.dirty_bytes=1073741824" in warning and "shutdown_deadline=10s" in warning
    off = policy_warning(replace(cfg, policy=PolicySettings(dirty_bytes=None)), 50 * MiB)
    assert off is not None and "unbounded" in off


def test_preemption_parsers() -> None:
    from autosaved.daemon.preempt import parse_aws, parse_azure, parse_gcp

    assert parse_aws(404, b"Not Found") is None
    notice = parse_aws(200, b'{"action": "terminate", "time": "2026-11-27T23:00:00Z"}')
    assert notice is not None and "terminate" in notice.detail
    assert parse_gcp(200, b"FALSE", "Google") is None and parse_gcp(200, b"TRUE\n", "Google") is not None
    with pytest.raises(ValueError, match="Metadata-Flavor"):
        parse_gcp(200, b"TRUE", None)  # not a GCP metadata server: never act on it
    assert parse_azure(200, b'{"DocumentIncarnation": 1, "Events": []}') is None
    reboot = b'{"DocumentIncarnation": 2, "Events": [{"EventId": "x", "EventType": "Reboot"}]}'
    assert parse_azure(200, reboot) is None
    assert parse_azure(200, reboot.replace(b"Reboot", b"Preempt")) is not None
    with pytest.raises(ValueError):
        parse_azure(500, b"")


def test_paced_large_chunks_round_trip(tmp_path: Path) -> None:
    import numpy as np

    import autosaved
    from autosaved.codec import pack
    from autosaved.storage.local import JobStore

    store = JobStore(tmp_path, os.geteuid(), "big-chunks")
    data = np.random.default_rng(5).integers(0, 255, 40 * MiB, dtype=np.uint8)
    announced: list[int] = []
    result = store.write_version(pack({"x": data}), version=1, step=1, reason="test", meta={}, sessions={},
                                 chunk_size=32 * MiB, pace=announced.append)
    assert sum(announced) == 40 * MiB and max(announced) == MiB  # every byte paced, in 1 MiB pieces
    assert result.chunks_written == 2
    assert np.array_equal(autosaved.restore("big-chunks", state_dir=tmp_path)["x"], data)
