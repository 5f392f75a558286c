"""policy.decide is pure: a table of (job view, now) → (reason, next wake) with a fake clock."""

from __future__ import annotations

import pytest

from autosaved.config import PolicySettings
from autosaved.policy import Decision, JobView, SaveReason, decide

S = PolicySettings(interval=600.0, idle=30.0, dirty_bytes=1000, min_gap=10.0, keep_last=3)


def view(**kw: object) -> JobView:
    base: dict[str, object] = {"settings": S, "dirty": True, "dirty_bytes": 10, "dirty_since": 100.0,
                               "last_update_at": 100.0, "last_save_at": None}
    base.update(kw)
    return JobView(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("job", "now", "expected"),
    [
        # clean job: nothing to do, nothing to wake for
        (view(dirty=False, dirty_bytes=0, dirty_since=None), 1000.0, Decision(None, None)),
        # idle fires exactly at last_update + idle, not before
        (view(), 129.9, Decision(None, 130.0)),
        (view(), 130.0, Decision(SaveReason.IDLE, None)),
        # dirty_bytes fires at once
        (view(dirty_bytes=1000), 100.0, Decision(SaveReason.DIRTY_BYTES, None)),
        (view(dirty_bytes=999), 100.0, Decision(None, 130.0)),
        # interval since the last save, while updates keep coming (idle never fires)
        (view(last_save_at=0.0, last_update_at=599.0, dirty_since=300.0), 599.5, Decision(None, 600.0)),
        (view(last_save_at=0.0, last_update_at=599.0, dirty_since=300.0), 600.0, Decision(SaveReason.INTERVAL, None)),
        # never saved: interval counts from when the job became dirty
        (view(dirty_since=100.0, last_update_at=690.0), 700.0, Decision(SaveReason.INTERVAL, None)),
        (view(dirty_since=100.0, last_update_at=690.0), 699.0, Decision(None, 700.0)),
        # min_gap holds back every rule but explicit
        (view(dirty_bytes=5000, last_save_at=95.0), 100.0, Decision(None, 105.0)),
        (view(dirty_bytes=5000, last_save_at=95.0), 105.0, Decision(SaveReason.DIRTY_BYTES, None)),
        (view(explicit_requested=True, last_save_at=99.9), 100.0, Decision(SaveReason.EXPLICIT, None)),
        # explicit fires even when the job is clean
        (view(dirty=False, explicit_requested=True), 100.0, Decision(SaveReason.EXPLICIT, None)),
        # a save in progress: the writer will wake the scheduler when it is done
        (view(saving=True, dirty_bytes=5000), 100.0, Decision(None, None)),
        # backoff after a failed save
        (view(dirty_bytes=5000, not_before=110.0), 100.0, Decision(None, 110.0)),
        (view(dirty_bytes=5000, not_before=110.0), 110.0, Decision(SaveReason.DIRTY_BYTES, None)),
    ],
)
def test_decide_table(job: JobView, now: float, expected: Decision) -> None:
    assert decide(job, now) == expected


def test_rules_can_be_turned_off() -> None:
    off = PolicySettings(interval=None, idle=None, dirty_bytes=None, min_gap=0.0)
    assert decide(view(settings=off, dirty_bytes=10**12), 10**6) == Decision(None, None)


def test_earliest_rule_wins_and_next_wake_is_the_earliest() -> None:
    s = PolicySettings(interval=50.0, idle=30.0, dirty_bytes=None, min_gap=0.0)
    # idle due at 130, interval due at 100 + 50 = 150: next wake is 130
    assert decide(view(settings=s), 120.0) == Decision(None, 130.0)
    s2 = PolicySettings(interval=20.0, idle=30.0, dirty_bytes=None, min_gap=0.0)
    assert decide(view(settings=s2), 120.0) == Decision(SaveReason.INTERVAL, None)


def test_fake_clock_walk_fires_once_per_quiet_period() -> None:
    """Walk a clock: updates every second until t=10, then silence; idle=3 fires at t=13 exactly."""
    s = PolicySettings(interval=None, idle=3.0, dirty_bytes=None, min_gap=0.0)
    fired = []
    t = 0.0
    while t <= 20.0:
        last_update = min(t, 10.0) // 1.0
        d = decide(view(settings=s, last_update_at=last_update, dirty_since=0.0), t)
        if d.reason is not None:
            fired.append((t, d.reason))
            break
        assert d.next_wake_at is not None and d.next_wake_at > t
        t = min(d.next_wake_at, t + 1.0)
    assert fired == [(13.0, SaveReason.IDLE)]


LOG = PolicySettings(interval=600.0, idle=30.0, dirty_bytes=None, min_gap=10.0, log_bytes=1000, replay_time=2.0)
MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("job", "now", "expected"),
    [
        # the log a restart would replay reached log_bytes: at once, min_gap or not (defect 11)
        (view(settings=LOG, log_bytes=999, replay_speed=1e9), 100.0, Decision(None, 130.0)),
        (view(settings=LOG, log_bytes=1000, replay_speed=1e9), 100.0, Decision(SaveReason.LOG_BYTES, None)),
        (view(settings=LOG, log_bytes=1000, replay_speed=1e9, last_save_at=99.0), 100.0,
         Decision(SaveReason.LOG_BYTES, None)),
        # ... or would take replay_time at the measured replay speed (here 400 bytes/s: 800 bytes is 2 s)
        (view(settings=LOG, log_bytes=799, replay_speed=400.0), 100.0, Decision(None, 130.0)),
        (view(settings=LOG, log_bytes=800, replay_speed=400.0), 100.0, Decision(SaveReason.LOG_BYTES, None)),
        # both off: the log is not bounded by this rule
        (view(settings=PolicySettings(interval=None, idle=None, dirty_bytes=None, log_bytes=None, replay_time=None),
              log_bytes=10**12, replay_speed=1.0), 100.0, Decision(None, None)),
        # the backoff after a failed save holds it too; a save in progress is waited for
        (view(settings=LOG, log_bytes=5000, not_before=110.0), 100.0, Decision(None, 110.0)),
        (view(settings=LOG, log_bytes=5000, saving=True), 100.0, Decision(None, None)),
        # a log over its bound with nothing unsaved (segments not dropped yet): a save would not shrink it
        (view(settings=LOG, dirty=False, log_bytes=5000), 100.0, Decision(None, None)),
        # a job loaded by replaying its log is saved at once, whatever min_gap and the other rules say
        (view(settings=LOG, recovery_pending=True, last_save_at=99.0), 100.0, Decision(SaveReason.RECOVERY, None)),
        (view(settings=LOG, recovery_pending=True, not_before=110.0), 100.0, Decision(None, 110.0)),
        (view(settings=LOG, recovery_pending=True, explicit_requested=True), 100.0,
         Decision(SaveReason.EXPLICIT, None)),
    ],
)
def test_log_bound_and_recovery_table(job: JobView, now: float, expected: Decision) -> None:
    assert decide(job, now) == expected


def test_default_log_bound_keeps_replay_short_whatever_dirty_bytes_is() -> None:
    """The defaults bound the log by bytes and by replay time, independently of dirty_bytes (off here)."""
    s = PolicySettings(dirty_bytes=None)
    assert s.log_bytes is not None and s.replay_time is not None and s.replay_time <= 2.0
    assert decide(view(settings=s, log_bytes=s.log_bytes, replay_speed=1e12), 100.0).reason is SaveReason.LOG_BYTES
    slow = view(settings=s, log_bytes=int(s.replay_time * 50 * MiB), replay_speed=50.0 * MiB)
    assert decide(slow, 100.0).reason is SaveReason.LOG_BYTES
