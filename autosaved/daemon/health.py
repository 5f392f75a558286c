"""``GET /healthz`` on ``metrics_address``: a pure function of the run state and the clock.

200 while the daemon serves and no long-lived task is failing; 503 while it starts, stops (the shutdown
flush refuses updates) or while a task that failed has not yet run cleanly for ``HEALTHY_AFTER`` seconds
since its restart (the supervisor restarts it after a growing pause: a task failing over and over stays
503, one that failed once recovers). A liveness probe that restarts a 503 daemon should allow for the
shutdown flush: the DaemonSet in examples/kubernetes/ does.
"""

from __future__ import annotations

from collections.abc import Mapping

from .runstate import Phase

# A restarted task counts as healthy again once it has run this long without failing.
HEALTHY_AFTER = 10.0


def failing_until(now: float, backoff: float) -> float:
    """Until when a task that failed at ``now`` and restarts after ``backoff`` seconds counts as failing."""
    return now + backoff + HEALTHY_AFTER


def health(phase: Phase, failing: Mapping[str, float], now: float) -> tuple[bool, str]:
    """(healthy, one line saying why)."""
    if phase is not Phase.SERVING:
        return False, f"{phase.value}: not serving"
    down = sorted(name for name, until in failing.items() if until > now)
    if down:
        return False, f"serving, but task{'s' if len(down) > 1 else ''} {', '.join(down)} failing"
    return True, "serving"
