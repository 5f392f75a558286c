"""The daemon's explicit run state (apscheduler 4's idea): which phase it is in, and the counters the
reports read. One small mutable record, written by the daemon's lifecycle and its rpc loop, read by the
helpers it is handed to."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class Phase(enum.Enum):
    STARTING = "starting"  # locks, probe, bind: nothing served yet
    SERVING = "serving"
    FLUSHING = "flushing"  # SIGTERM: updates refused, every dirty job being committed
    STOPPED = "stopped"


@dataclass
class RunState:
    phase: Phase = Phase.STARTING
    started_at: float = field(default_factory=time.time)
    # The preemption notice's detail, once one came.
    preempted: str | None = None
    exit_code: int = 0
    requests: int = 0
    errors: int = 0
    # Long-lived tasks that failed and were restarted.
    task_failures: int = 0
    # Per task that failed: until when (monotonic) it counts as failing for /healthz (see health.py).
    failing_until: dict[str, float] = field(default_factory=dict)
    # Requests refused by a per-user quota (the metrics' autosaved_quota_refusals_total).
    quota_refusals: int = 0
    # Requests dropped unapplied because their client's deadline (``expires``) passed while they waited.
    expired: int = 0
    # Requests over quota.max_requests dropped unanswered (past the refusals answered per user a second).
    requests_unanswered: int = 0

    @property
    def shutting_down(self) -> bool:
        """New updates and saves are refused: the shutdown flush has begun (or is over)."""
        return self.phase in (Phase.FLUSHING, Phase.STOPPED)
