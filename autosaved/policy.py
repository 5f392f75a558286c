"""When to save a job: a pure function of (job view, now).

``decide`` never reads a clock or touches I/O; the scheduler passes ``now`` and sleeps until the
earliest ``next_wake_at`` over all jobs (or until an update wakes it), so nothing polls.

Rules (any one fires a save):
- ``explicit``: a client or the CLI asked for a save; fires at once, ignores ``min_gap``.
- ``recovery``: the job was loaded by replaying log records over its newest version; fires at once,
  ignores ``min_gap``, so each restart's replay is the last one of those records.
- ``log_bytes``: the write-ahead log past the newest version reached ``log_bytes``, or would take longer
  than ``replay_time`` to replay at the measured replay speed; fires at once and ignores ``min_gap`` (it
  bounds how long a restart takes, whatever ``dirty_bytes`` allows).
- ``dirty_bytes``: unsaved bytes reached the threshold.
- ``interval``: the job has been dirty and its last committed save (or, if it never saved, the moment
  it became dirty) is ``interval`` old.
- ``idle``: the job is dirty and no delta arrived for ``idle`` seconds.
- after a failed save, nothing fires before ``not_before`` (the writer's backoff).
- ``min_gap``: no rule but ``explicit`` (and ``shutdown``, handled by the daemon) saves a job sooner than
  ``min_gap`` after its previous save started.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .settings import PolicySettings


class SaveReason(StrEnum):
    EXPLICIT = "explicit"
    DIRTY_BYTES = "dirty_bytes"
    INTERVAL = "interval"
    IDLE = "idle"
    SHUTDOWN = "shutdown"
    PREEMPTION = "preemption"
    RECOVERY = "recovery"
    LOG_BYTES = "log_bytes"


@dataclass(frozen=True)
class JobView:
    """What policy needs to know about one job. Times are on the scheduler's monotonic clock."""

    settings: PolicySettings
    dirty: bool
    dirty_bytes: int = 0
    dirty_since: float | None = None
    last_update_at: float | None = None
    last_save_at: float | None = None
    explicit_requested: bool = False
    saving: bool = False
    # After a failed save: no new attempt before this time (backoff), whatever rule fires.
    not_before: float | None = None
    # Bytes of write-ahead log a restart would replay, and how fast this host replays (bytes/s).
    log_bytes: int = 0
    replay_speed: float = 200.0 * 1024**2
    # Loaded by a replay of log records that no version covers yet.
    recovery_pending: bool = False


def log_over_bound(job: JobView) -> bool:
    """Whether the log a restart would replay is past ``log_bytes`` or ``replay_time`` (pure)."""
    return log_over(job.settings, job.log_bytes, job.replay_speed)


def log_over(s: PolicySettings, log_bytes: int, replay_speed: float) -> bool:
    """:func:`log_over_bound` from the three figures it reads (after each log append: no view is built)."""
    if s.log_bytes is not None and log_bytes >= s.log_bytes:
        return True
    return s.replay_time is not None and log_bytes >= s.replay_time * replay_speed


@dataclass(frozen=True)
class Decision:
    reason: SaveReason | None
    next_wake_at: float | None


def decide(job: JobView, now: float) -> Decision:
    if job.saving:
        # The writer tells the scheduler when it is done; deciding now would only queue a duplicate.
        return Decision(None, None)
    if job.not_before is not None and now < job.not_before and (job.dirty or job.explicit_requested):
        return Decision(None, job.not_before)
    if job.explicit_requested:
        return Decision(SaveReason.EXPLICIT, None)
    if not job.dirty:
        return Decision(None, None)
    if job.recovery_pending:
        return Decision(SaveReason.RECOVERY, None)
    if log_over_bound(job):
        return Decision(SaveReason.LOG_BYTES, None)

    s = job.settings
    candidates: list[tuple[float, SaveReason]] = []
    if s.dirty_bytes is not None and job.dirty_bytes >= s.dirty_bytes:
        candidates.append((now, SaveReason.DIRTY_BYTES))
    if s.interval is not None:
        base = job.last_save_at if job.last_save_at is not None else job.dirty_since
        if base is not None:
            candidates.append((base + s.interval, SaveReason.INTERVAL))
    if s.idle is not None and job.last_update_at is not None:
        candidates.append((job.last_update_at + s.idle, SaveReason.IDLE))
    if not candidates:
        return Decision(None, None)

    earliest_allowed = job.last_save_at + s.min_gap if job.last_save_at is not None else now
    due_at, reason = min(candidates, key=lambda c: c[0])
    due_at = max(due_at, earliest_allowed)
    if due_at <= now:
        return Decision(reason, None)
    return Decision(None, due_at)
