"""The throttle at work: sample the disk, step the controller, hand the rate to the writer's bucket; and
the write-speed facts the deadline needs (a startup probe, the derived ``dirty_bytes`` default, the
warning when a configured policy cannot be flushed in time)."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio

from ..config import Config
from ..storage.fsutil import temp_name, write_fsync
from ..throttle import Controller, Load, ThrottleState, initial_state, measure, step
from .iosampler import IoSampler
from .speedmemo import SpeedMemo, combine, worth_storing
from .writer import Writer

log = logging.getLogger("autosaved.throttle")

PROBE_BYTES = 32 * 1024 * 1024
# The first start on a disk probes this many times (PROBE_BYTES each) and keeps the median, so one stalled
# or cached sample cannot set the figure. On the busy 2-core host the median's spread over 5 runs (max/min
# 1.51 to 1.98) stayed close to single probes' (1.65 to 2.52): the host's load moves between runs. What
# makes the figure stable is remembering it: later starts read it (speedmemo.py), saves refine it.
PROBE_SAMPLES = 4
# Derived dirty_bytes is this share of what the disk writes within the deadline: the rest is margin
# for other jobs, fsync latency and a disk that is slower at shutdown than when it was measured.
DIRTY_SHARE = 0.5
MIN_DERIVED_DIRTY = 64 * 1024 * 1024


def probe_write_speed(directory: Path, nbytes: int = PROBE_BYTES) -> float:
    """Write ``nbytes`` (fsynced, pages dropped) in ``directory`` and return bytes/s."""
    directory.mkdir(parents=True, exist_ok=True)
    for leftover in directory.glob(".speed-probe.*.tmp"):  # from a daemon killed mid-probe
        leftover.unlink(missing_ok=True)
    path = temp_name(directory, "speed-probe")
    block = os.urandom(1024 * 1024)  # random, so a compressing or deduplicating disk cannot cheat
    started = time.perf_counter()
    try:
        write_fsync(path, [block] * (nbytes // len(block)), drop_cache=True)
    finally:
        path.unlink(missing_ok=True)
    return nbytes / max(1e-6, time.perf_counter() - started)


def probe_samples(directory: Path, samples: int = PROBE_SAMPLES, nbytes: int = PROBE_BYTES) -> list[float]:
    """``samples`` probes of ``nbytes`` each."""
    return [probe_write_speed(directory, nbytes) for _ in range(samples)]


def derived_dirty_bytes(speed: float, deadline: float) -> int:
    mib = 1024 * 1024
    return max(MIN_DERIVED_DIRTY, int(speed * deadline * DIRTY_SHARE) // mib * mib)


def policy_warning(config: Config, speed: float) -> str | None:
    """Why the configured policy may leave more unsaved than a flush can write in the deadline, or None."""
    dirty = config.policy.dirty_bytes
    budget = speed * config.shutdown_deadline
    if dirty is None:
        return (f"policy.dirty_bytes is off: unsaved bytes are unbounded, and a shutdown flush writes about "
                f"{budget / 2**20:.0f} MiB in shutdown_deadline={config.shutdown_deadline:g}s")
    if dirty > budget:
        return (f"policy.dirty_bytes={dirty} cannot be flushed within shutdown_deadline="
                f"{config.shutdown_deadline:g}s at {speed / 2**20:.0f} MiB/s (the measured write speed, "
                f"held to throttle.max_write_rate): a job may lose its unsaved updates on SIGTERM")
    return None


class IoControl:
    def __init__(self, config: Callable[[], Config], writer: Writer, clock: Callable[[], float]) -> None:
        t = config().throttle
        # The daemon's live config, read through this getter: the daemon's apply_config is its one writer.
        self.config = config
        self.writer = writer
        self.clock = clock
        self.enabled = t.enabled
        self.ctl = Controller(min_write_rate=float(t.min_write_rate),
                              max_write_rate=None if t.max_write_rate is None else float(t.max_write_rate))
        self.state: ThrottleState = initial_state(self.ctl)
        self.load = Load()
        self.disks: list[str] = []
        self.probed_speed: float | None = None
        # With write_speed = "auto": where the figure is remembered, and the last figure stored there.
        self.memo: SpeedMemo | None = None
        self._stored: float | None = None

    async def run(self) -> None:
        """Sample every ``throttle.sample_interval`` and steer the writer's bucket (forever)."""
        sampler = IoSampler(self.config().state_dir, lambda: self.writer.bucket.paced_bytes, self.clock)
        self.disks = sampler.disks
        # Reading /proc and /sys files never blocks on the disk, so this stays in the event loop.
        prev = sampler.sample()
        while True:
            await anyio.sleep(self.config().throttle.sample_interval)
            cur = sampler.sample()
            await self._remember_learned_speed()
            self.load = measure(prev, cur)
            prev = cur
            if self.enabled:
                before = self.state.rate
                self.state = step(self.ctl, self.state, self.load, cur.at)
                self.writer.bucket.rate = self.state.rate
                if self.state.rate != before and (math.isinf(before) or math.isinf(self.state.rate)
                                                  or abs(self.state.rate - before) > 0.25 * before):
                    log.debug("allowed rate %s (util=%s others=%s psi_some=%s dirty=%s)",
                              _rate(self.state.rate), self.load.utilisation, self.load.others_bps,
                              self.load.psi_some, self.load.dirty_bytes)

    async def measure_speed(self) -> Config:
        """Probe the disk once; return the config (for the daemon to apply) with ``policy.dirty_bytes``
        derived when not set, and warn when a configured one cannot be flushed within the deadline."""
        tmp = self.config().state_dir / "tmp"
        configured = self.config().write_speed
        if configured is not None:
            # Configured: no probe (it writes and fsyncs 32 MiB, ~1 s on a busy disk, at every start).
            speed = float(configured)
        else:
            try:
                speed = await anyio.to_thread.run_sync(lambda: self._remembered_or_probed(tmp))
            except OSError as exc:
                log.warning("write speed probe in %s failed (%s); planning with the default", tmp, exc)
                return self.config()
        self.probed_speed = speed
        self.writer.note_speed(speed)
        plan_speed = self.writer.flush_speed()
        config = self.config()
        if config.dirty_bytes_auto:
            derived = derived_dirty_bytes(plan_speed, config.shutdown_deadline)
            config = replace(config, policy=replace(config.policy, dirty_bytes=derived))
            log.info("write speed %.0f MiB/s: policy.dirty_bytes defaults to %d (%.0f%% of what a flush writes "
                     "in shutdown_deadline=%gs)", speed / 2**20, derived, DIRTY_SHARE * 100, config.shutdown_deadline)
        else:
            log.info("write speed %.0f MiB/s", speed / 2**20)
            warning = policy_warning(config, plan_speed)
            if warning:
                log.warning("%s", warning)
        return config

    def _remembered_or_probed(self, tmp: Path) -> float:
        """The figure stored for this disk by an earlier start (refined by its saves), else the median of
        several probes, stored for the next start (issue 22: one probe swung 8x between starts)."""
        state_dir = self.config().state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.memo = SpeedMemo(state_dir)
        remembered = self.memo.load()
        if remembered is not None:
            log.info("write speed %.0f MiB/s remembered for disk %s in %s (refined by real saves; delete the "
                     "file to probe again)", remembered / 2**20, self.memo.key, self.memo.path)
            self._stored = remembered
            return remembered
        samples = probe_samples(tmp)
        speed = combine(samples)
        log.info("write speed probe: %s MiB/s, median %.0f MiB/s, remembered for disk %s",
                 "/".join(f"{s / 2**20:.0f}" for s in samples), speed / 2**20, self.memo.key)
        self._store(speed, "probe")
        return speed

    def _store(self, speed: float, source: str) -> None:
        assert self.memo is not None
        try:
            self.memo.store(speed, source)
            self._stored = speed
        except OSError as exc:
            log.warning("could not remember the write speed in %s: %s", self.memo.path, exc)

    async def _remember_learned_speed(self) -> None:
        """Store the writer's smoothed speed once real saves moved it (only with write_speed = "auto")."""
        speed = self.writer.write_speed
        if self.memo is None or speed is None or not worth_storing(self._stored, speed):
            return
        self._stored = speed  # at most one attempt per change, even if the write fails
        await anyio.to_thread.run_sync(lambda: self._store(speed, "saves"))

    def reconfigure(self, new: Config) -> Config:
        """A reloaded config: apply its [throttle] table, and derive ``policy.dirty_bytes`` again when it
        is left to the default. Returns the config the daemon should use."""
        t = new.throttle
        self.enabled = t.enabled
        self.ctl = Controller(min_write_rate=float(t.min_write_rate),
                              max_write_rate=None if t.max_write_rate is None else float(t.max_write_rate))
        self.writer.bucket.cap = math.inf if t.max_write_rate is None else float(t.max_write_rate)
        if new.dirty_bytes_auto and self.probed_speed is not None:
            derived = derived_dirty_bytes(self.writer.flush_speed(), new.shutdown_deadline)
            new = replace(new, policy=replace(new.policy, dirty_bytes=derived))
        elif self.probed_speed is not None and (warning := policy_warning(new, self.writer.flush_speed())):
            log.warning("%s", warning)
        return new

    def status(self) -> dict[str, Any]:
        bucket = self.writer.bucket
        rate = bucket.effective_rate()
        return {
            "enabled": self.enabled,
            "allowed_rate": None if math.isinf(rate) else round(rate),
            "contended": self.state.contended,
            "disks": self.disks,
            "utilisation": None if self.load.utilisation is None else round(self.load.utilisation, 3),
            "others_bps": None if self.load.others_bps is None else round(self.load.others_bps),
            "psi_some": self.load.psi_some,
            "psi_full": self.load.psi_full,
            "dirty_writeback_bytes": self.load.dirty_bytes,
            "throttled_s": round(bucket.throttled_s, 3),
            # Saves someone waited for (explicit, committed-wait, import, flush), which the adaptive rate
            # does not hold back, and background saves promoted to that when a client began to wait.
            "urgent_saves": self.writer.urgent_saves,
            "promoted_saves": self.writer.promoted_saves,
            "write_speed": None if self.writer.write_speed is None else round(self.writer.write_speed),
        }


def _rate(rate: float) -> str:
    return "unlimited" if math.isinf(rate) else f"{rate / 2**20:.1f} MiB/s"
