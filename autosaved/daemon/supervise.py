"""Supervision of the daemon's long-lived tasks: a failure is logged and the task restarted after a
growing pause, never the daemon's end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from ..storage.faults import point
from .health import failing_until
from .runstate import RunState

log = logging.getLogger("autosaved.daemon")


def supervise(tg: anyio.abc.TaskGroup, run_state: RunState, name: str, func: Callable[..., Any], *args: Any) -> None:
    """Run a long-lived task that restarts (after a growing pause) whenever it fails: one task's bug
    costs a log line and a retry, never the daemon and every job it holds."""

    async def run() -> None:
        backoff = 0.1
        while True:
            try:
                point("task", name, "start")
                await func(*args)
                return  # done (a watchdog with nothing to ping, a preemption notice handled)
            except Exception:
                log.exception("task %s failed; restarting it in %.1fs", name, backoff)
                run_state.task_failures += 1
                run_state.failing_until[name] = failing_until(time.monotonic(), backoff)
            await anyio.sleep(backoff)
            backoff = min(30.0, backoff * 2)
            log.info("task %s restarting", name)

    tg.start_soon(run, name=f"autosaved-{name}")
