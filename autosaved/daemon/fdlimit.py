"""The daemon's file-descriptor budget (issue 19, defect 1).

Every connection the daemon accepts costs one fd, and libzmq aborts the whole process (``Too many open
files``, ``ipc_listener.cpp``) when ``accept()`` fails with ``EMFILE`` on its ipc listener: any local user
who opens enough idle connections would take every job down with it. So:

- at start the soft ``RLIMIT_NOFILE`` is raised to the hard one (the systemd unit sets a high
  ``LimitNOFILE``; systemd's default soft limit is 1024);
- each listener's connection cap is ``max_connections``, lowered where the fd limit is too small to hold
  every listener at its cap with half of the fds left over: that half is the daemon's own files (chunks,
  logs, memfds, threads) and the headroom that absorbs a burst of connections libzmq accepts before the
  daemon refuses them (see :mod:`autosaved.daemon.connguard`).
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger("autosaved.daemon")

# The daemon's listeners whose connections are capped: the ipc socket, the fd socket, the metrics port.
LISTENERS = 3


def nr_open() -> int:
    """The kernel's ceiling on any process's fd limit (what an unlimited hard limit means)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return 1024 * 1024


def raise_nofile() -> int:
    """Raise the soft fd limit to the hard one; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return target if soft == resource.RLIM_INFINITY else soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the fd limit from %d to %d: %s", soft, target, exc)
        return soft
    log.info("fd limit raised from %d to %d", soft, target)
    return target


def listener_cap(configured: int, fd_limit: int) -> int:
    """Connections one listener may hold: ``configured``, or less so that all listeners at their caps use
    at most half of ``fd_limit`` (pure: the tests and the startup warning share it)."""
    return max(1, min(configured, fd_limit // (2 * LISTENERS)))
