"""How fast background saves may write (and uploads may send): a pure controller of (samples, now), plus
the token bucket that applies its answer.

The samplers (``daemon/iosampler.py``) read cumulative counters; :func:`measure` turns two consecutive
samples into a :class:`Load` (rates over the interval), and :func:`step` turns the previous
:class:`ThrottleState` and that load into the next allowed rate. Nothing here reads a clock or a file,
so recorded traces replay exactly in the tests.

The controller is AIMD, like TCP congestion control, because the signal is noisy and one-sided: we can
see that others suffer (the disk is busy with bytes that are not ours, tasks stall on I/O, dirty pages
pile up) but not how much rate they would need. So:

- **contention** (others move bytes while the device is busy or I/O pressure is high, or the system-wide
  ``full`` pressure or dirty page cache is high whoever causes it): halve the rate, at most once per
  ``decrease_every`` so one bad second does not collapse it to the floor;
- otherwise **recover** additively, ``recover_per_s`` per second, up to the ceiling; once there the rate
  opens to ``max_write_rate`` (or unlimited);
- never below ``min_write_rate``: a save always finishes.

Missing counters (containers without ``/sys/block`` or PSI) make the corresponding signal absent, never
fatal: with no signal at all the controller cannot see contention and only enforces ``max_write_rate``.

Uploads to the object store run the same :func:`step` with :func:`upload_controller`'s tuning on a
network :class:`Load` (:func:`measure_net`): others' bytes on the interfaces that reach the store while
the link is busy (its capacity, where the kernel knows it), or a high share of retransmitted TCP segments
(congestion on the path, whoever caused it). Virtual NICs often report no capacity, and loopback never
retransmits: then only the retransmission signal (or nothing) is left, and the cap (``upload_rate``) holds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

MiB = 1024 * 1024


class SaveAborted(Exception):
    """Raised inside a save's write loop when the daemon gives up on it (shutdown deadline passed)."""


@dataclass(frozen=True)
class IoSample:
    """Cumulative counters at one instant; ``None`` where the system does not provide them."""

    at: float  # monotonic seconds
    busy_ms: float | None = None  # device busy time (max over the disks under the state dir)
    device_bytes: int | None = None  # bytes read + written on those disks
    own_bytes: int = 0  # bytes the daemon itself wrote
    psi_some: float | None = None  # /proc/pressure/io "some" avg10, percent
    psi_full: float | None = None  # /proc/pressure/io "full" avg10, percent
    dirty_bytes: int | None = None  # /proc/meminfo Dirty + Writeback


@dataclass(frozen=True)
class Load:
    """What the disk looked like over one sampling interval."""

    utilisation: float | None = None  # 0..1
    others_bps: float | None = None  # device bytes/s that the daemon did not write
    psi_some: float | None = None
    psi_full: float | None = None
    dirty_bytes: int | None = None
    loss: float | None = None  # network only: the share of TCP segments sent that were retransmissions


def measure(prev: IoSample, cur: IoSample) -> Load:
    dt = cur.at - prev.at
    util = others = None
    if dt > 0 and prev.busy_ms is not None and cur.busy_ms is not None:
        util = min(1.0, max(0.0, (cur.busy_ms - prev.busy_ms) / 1000.0 / dt))
    if dt > 0 and prev.device_bytes is not None and cur.device_bytes is not None:
        # Our own bytes reach the device later than we count them (writeback), so the difference can
        # dip below zero for a moment: clamp, never report negative traffic.
        others = max(0.0, (cur.device_bytes - prev.device_bytes) - (cur.own_bytes - prev.own_bytes)) / dt
    return Load(util, others, cur.psi_some, cur.psi_full, cur.dirty_bytes)


@dataclass(frozen=True)
class Controller:
    """Controller tuning; the defaults are what the daemon runs with."""

    min_write_rate: float = 16 * MiB
    max_write_rate: float | None = None  # None: unlimited when nobody else needs the disk
    start_rate: float = 64 * MiB  # where a back-off from "unlimited" starts halving
    open_rate: float = 512 * MiB  # recovering past this (with no cap) means unlimited again
    recover_per_s: float = 32 * MiB
    decrease_every: float = 0.5
    busy_util: float = 0.3  # device busy fraction that, with others' traffic, counts as contention
    others_min_bps: float = 1 * MiB  # others' traffic below this is noise (metadata, logs)
    psi_some_high: float = 10.0
    psi_full_high: float = 5.0
    dirty_high: int = 512 * MiB
    loss_high: float = 0.02  # retransmitted share of TCP segments: the path is congested

    @property
    def ceiling(self) -> float:
        return self.max_write_rate if self.max_write_rate is not None else math.inf


@dataclass(frozen=True)
class ThrottleState:
    rate: float  # bytes/s; math.inf = unlimited
    updated_at: float | None = None
    last_decrease_at: float | None = None
    contended: bool = False


def initial_state(ctl: Controller) -> ThrottleState:
    return ThrottleState(rate=ctl.ceiling)


def contention(ctl: Controller, load: Load) -> bool:
    """Do others need the disk more than our saves do?"""
    others_active = load.others_bps is not None and load.others_bps >= ctl.others_min_bps
    if others_active and load.utilisation is not None and load.utilisation >= ctl.busy_util:
        return True
    if others_active and load.psi_some is not None and load.psi_some >= ctl.psi_some_high:
        return True
    # "full" pressure (every non-idle task stalled on I/O) and a dirty page cache hurt the trainer
    # whoever caused them, our own writes included: back off either way.
    if load.psi_full is not None and load.psi_full >= ctl.psi_full_high:
        return True
    # Retransmissions mean a queue on the path overflowed, whoever filled it: back off either way.
    if load.loss is not None and load.loss >= ctl.loss_high:
        return True
    return load.dirty_bytes is not None and load.dirty_bytes >= ctl.dirty_high


def step(ctl: Controller, state: ThrottleState, load: Load, now: float) -> ThrottleState:
    """The next allowed rate after observing ``load`` at ``now``."""
    ceiling = ctl.ceiling
    elapsed = 0.0 if state.updated_at is None else max(0.0, now - state.updated_at)
    if contention(ctl, load):
        if state.last_decrease_at is not None and now - state.last_decrease_at < ctl.decrease_every:
            return replace(state, updated_at=now, contended=True)
        base = min(state.rate, ceiling)
        if math.isinf(base):
            base = ctl.start_rate * 2  # halving "unlimited" starts from a nominal rate
        rate = max(ctl.min_write_rate, base / 2)
        return ThrottleState(rate=rate, updated_at=now, last_decrease_at=now, contended=True)
    if math.isinf(state.rate):
        return replace(state, updated_at=now, contended=False)
    rate = state.rate + ctl.recover_per_s * elapsed
    if rate >= ceiling or (math.isinf(ceiling) and rate >= ctl.open_rate):
        rate = ceiling
    return ThrottleState(rate=max(ctl.min_write_rate, rate), updated_at=now,
                         last_decrease_at=state.last_decrease_at, contended=False)


# -- the network: the same controller steering uploads to the object store ------------------------------


@dataclass(frozen=True)
class NetSample:
    """Cumulative network counters at one instant; ``None`` where the system does not provide them."""

    at: float  # monotonic seconds
    tx_bytes: int | None = None  # bytes sent on the interfaces the route to the store uses
    own_bytes: int = 0  # bytes the replicator itself sent
    link_bps: float | None = None  # those interfaces' capacity in bytes/s, where the kernel knows it
    out_segs: int | None = None  # TCP segments sent (/proc/net/snmp OutSegs) ...
    retrans_segs: int | None = None  # ... and of them, retransmissions (RetransSegs)


# Fewer segments than this in an interval make the retransmitted share noise, not a signal.
MIN_SEGMENTS = 200


def measure_net(prev: NetSample, cur: NetSample) -> Load:
    """Two network samples as a :class:`Load`: link utilisation (when its capacity is known), others'
    traffic on it, and the retransmitted share of TCP segments. The disk's fields stay ``None``."""
    dt = cur.at - prev.at
    util = others = loss = None
    if dt > 0 and prev.tx_bytes is not None and cur.tx_bytes is not None:
        sent = max(0, cur.tx_bytes - prev.tx_bytes)
        # Our bytes and the interface's counters are read at slightly different instants: clamp at 0.
        others = max(0.0, sent - (cur.own_bytes - prev.own_bytes)) / dt
        if cur.link_bps:
            util = min(1.0, sent / dt / cur.link_bps)
    if (prev.out_segs is not None and prev.retrans_segs is not None and cur.out_segs is not None
            and cur.retrans_segs is not None and cur.out_segs - prev.out_segs >= MIN_SEGMENTS):
        loss = max(0, cur.retrans_segs - prev.retrans_segs) / (cur.out_segs - prev.out_segs)
    return Load(utilisation=util, others_bps=others, loss=loss)


def upload_controller(cap: float | None) -> Controller:
    """The controller tuned for uploads: a link is slower than a disk and others' flows (the trainer's
    data loading, a collective) are often bursty, so it starts lower, recovers slower and never goes below
    1 MiB/s (an upload always finishes). ``cap``: ``[remote] upload_rate``, the ceiling."""
    return Controller(min_write_rate=1 * MiB, max_write_rate=cap, start_rate=32 * MiB, open_rate=256 * MiB,
                      recover_per_s=4 * MiB, busy_util=0.5, others_min_bps=256 * 1024)


class TokenBucket:
    """Holds writers to ``rate`` bytes/s. Called from worker threads (the storage ``Pacer`` hook) while
    the event loop changes the rate, so it takes a lock; waiting happens outside it, in short sleeps, so
    a rate change or an abort takes effect within ``tick`` seconds."""

    def __init__(self, rate: float = math.inf, *, burst_s: float = 0.05, tick: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.tick = tick
        self.clock = clock
        self.sleep = sleep
        self.bypass = False  # deadline flush: the adaptive rate no longer applies (the cap still does)
        self.cap = math.inf
        self.aborted = False
        self.throttled_s = 0.0
        self.paced_bytes = 0
        self._tokens = 0.0
        self._last = clock()
        self.lock = threading.Lock()

    def effective_rate(self) -> float:
        return min(self.cap, math.inf if self.bypass else self.rate)

    def __call__(self, nbytes: int) -> None:
        """Block until ``nbytes`` may be written (at the adaptive rate, under the cap)."""
        self.take(nbytes)

    def take(self, nbytes: int, pace: SavePace | None = None) -> None:
        """Block until ``nbytes`` may be written; the time held back is added to ``pace.throttled_s``. A
        save someone waits for (``pace.urgent``, read under the lock at every tick, so a promotion takes
        effect at the next one) is held only to the hard cap."""
        while True:
            if self.aborted:
                raise SaveAborted("the save was abandoned (shutdown deadline passed)")
            with self.lock:
                urgent = pace is not None and pace.urgent
                rate = self.cap if urgent else self.effective_rate()
                now = self.clock()
                if math.isinf(rate):
                    if not urgent:
                        # Leave the tokens of background saves alone while an urgent one passes.
                        self._tokens, self._last = 0.0, now
                    self.paced_bytes += nbytes
                    return
                # A burst allowance of at least one piece: otherwise a rate below piece/burst_s would
                # never accumulate enough tokens.
                limit = max(float(nbytes), rate * self.burst_s)
                self._tokens = min(limit, self._tokens + (now - self._last) * rate)
                self._last = now
                if self._tokens >= nbytes - 1.0:  # a byte of slack absorbs float rounding
                    self._tokens -= nbytes
                    self.paced_bytes += nbytes
                    return
                wait = min(self.tick, max(0.001, (nbytes - self._tokens) / rate))
                self.throttled_s += wait
                if pace is not None:
                    pace.throttled_s += wait
            self.sleep(wait)


class SavePace:
    """One save's way through the shared :class:`TokenBucket` (the storage ``pace`` hook).

    A background save (policy: dirty bytes, interval, idle) takes the adaptive rate; a save someone waits
    for (``urgent``: an explicit ``save()``, a ``wait="committed"`` update, an import, the deadline flush)
    is held only to the hard ``max_write_rate``: the README's promise that ``[throttle]`` governs
    background saves. :meth:`promote` makes a running background save urgent when someone starts waiting
    for it; it stops waiting within one bucket tick."""

    def __init__(self, bucket: TokenBucket, *, urgent: bool = False) -> None:
        self.bucket = bucket
        self.urgent = urgent
        self.promoted = False
        self.throttled_s = 0.0
        self.throttled_at_promotion: float | None = None

    def promote(self) -> bool:
        """Make the save urgent; True if it was a background save until now."""
        with self.bucket.lock:  # the bucket reads ``urgent`` under it
            if self.urgent:
                return False
            self.throttled_at_promotion = self.throttled_s
            self.promoted = True
            self.urgent = True
            return True

    @property
    def kind(self) -> str:
        return "promoted" if self.promoted else "urgent" if self.urgent else "background"

    @property
    def throttled_since_promotion(self) -> float | None:
        return None if self.throttled_at_promotion is None else self.throttled_s - self.throttled_at_promotion

    def __call__(self, nbytes: int) -> None:
        self.bucket.take(nbytes, self)
