"""Prometheus endpoint (``metrics_address``, off by default), built on ``prometheus_client``.

The daemon hands over a :class:`Sample` (what it knows at one instant); :func:`families` turns it into
metric families and :func:`render` into exposition text, both pure, so the format is tested without
sockets. :func:`serve_metrics` is the I/O edge: a minimal HTTP/1.0 responder on an anyio TCP listener,
behind the same capped, EMFILE-proof accept loop as the fd socket (:mod:`autosaved.daemon.accept`): the
port is open to every local user, and a flood of idle connections must cost neither the daemon's fds
nor a thread each (which a threaded WSGI server would). The sample is taken on the event loop (the
daemon's state is only read there); the rendering runs in a worker thread.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

import anyio
import anyio.abc
import anyio.to_thread
import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..errors import AutosavedError
from ..storage.faults import point

log = logging.getLogger("autosaved.metrics")

MAX_REQUEST = 8192
CONTENT_TYPE = prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# A log sync is one write + fdatasync: sub-millisecond on a quiet SSD, seconds on a saturated disk.
LOG_SYNC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Histogram(prometheus_client.Histogram):
    """Save durations in seconds (time from snapshot to committed manifest), or another duration named on
    creation. Thread-safe: the writer observes from its worker threads. Unregistered: it is reported
    through :class:`Sample`."""

    def __init__(self, name: str = "autosaved_save_duration_seconds",
                 help_text: str = "Time from snapshot to committed manifest.",
                 buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        super().__init__(name, help_text, buckets=buckets, registry=None)


class Frozen(Collector):
    """A collector's families as they were when the sample was taken. The page is rendered later, in a
    thread, and a live histogram read then could count a log sync that the sample's counter had not (the
    loop's bookkeeping of a sync answered from its thread comes a moment after the ack)."""

    def __init__(self, source: Collector) -> None:
        self._families = list(source.collect())

    def collect(self) -> Iterable[Metric]:
        return self._families


def log_sync_histogram() -> Histogram:
    return Histogram("autosaved_log_sync_duration_seconds",
                     "Time of one write-ahead log append and its fdatasync (a group commit).", LOG_SYNC_BUCKETS)


@dataclass(frozen=True)
class JobSample:
    job: str
    owner: int
    saves: int
    bytes_written: int
    dirty_bytes: int
    held_bytes: int
    state_bytes: int
    consecutive_failures: int
    saving: bool
    last_save_time: str | None


@dataclass(frozen=True)
class ReplicaSample:
    """One job the replicator holds (with ``[remote]``)."""

    job: str
    owner: int
    replicated: int | None  # newest local version in the bucket
    fenced: bool  # another host took the job over: this one uploads nothing more of it
    backlog_bytes: int  # bytes of committed versions still to upload


@dataclass(frozen=True)
class RemoteSample:
    bytes_uploaded: int
    upload_errors: int
    replicas: tuple[ReplicaSample, ...]


@dataclass(frozen=True)
class CacheSample:
    """The state cache (statecache.py): its accounted bytes, its limit and its counters."""

    nbytes: int
    limit: int
    hits: int
    loads: int
    evictions: int


@dataclass(frozen=True)
class Sample:
    uptime_s: float
    requests: int
    request_errors: int
    saves: int
    save_failures: int
    bytes_written: int
    reloads: int
    reload_failures: int
    # Long-lived daemon tasks that failed and were restarted (each one a bug or an outside fault: alert on it).
    task_restarts: int
    durations: Histogram
    jobs: tuple[JobSample, ...]
    # Pacing rate of background saves in bytes/s, when a throttle is in use.
    throttle_rate: float | None = None
    # Write-ahead log group commits (each one fdatasync) and their durations; requests refused by a quota.
    log_syncs: int = 0
    log_sync_durations: Collector | None = None
    quota_refusals: int = 0
    # Requests dropped unapplied because their client's deadline passed while they waited (issue 19).
    expired: int = 0
    # With ``[remote]``: upload counters and the jobs the replicator holds; ``None`` without it.
    remote: RemoteSample | None = None
    cache: CacheSample | None = None


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def families(s: Sample) -> Iterator[Metric]:
    """The metric families of one sample (names as the README lists them)."""

    def gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_text, value=value)

    def counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(name, help_text, value=value)

    yield gauge("autosaved_uptime_seconds", "Seconds since the daemon started.", s.uptime_s)
    yield counter("autosaved_requests_total", "Requests received.", s.requests)
    yield counter("autosaved_request_errors_total", "Requests answered with an error.", s.request_errors)
    yield counter("autosaved_saves_total", "Versions committed since the daemon started.", s.saves)
    yield counter("autosaved_save_errors_total", "Saves that failed (they are retried).", s.save_failures)
    yield counter("autosaved_written_bytes_total", "Bytes written by saves (chunks and manifests).",
                  s.bytes_written)
    yield counter("autosaved_config_reloads_total", "Config reloads applied.", s.reloads)
    yield counter("autosaved_config_reload_errors_total", "Config reloads rejected as invalid.", s.reload_failures)
    yield counter("autosaved_task_restarts_total", "Daemon tasks that failed and were restarted.", s.task_restarts)
    if s.throttle_rate is not None:
        yield gauge("autosaved_throttle_bytes_per_second", "Write rate allowed for background saves.",
                    s.throttle_rate)
    yield counter("autosaved_log_syncs_total", "Write-ahead log group commits (one fdatasync each).", s.log_syncs)
    yield counter("autosaved_quota_refusals_total", "Requests refused by a per-user quota.", s.quota_refusals)
    yield counter("autosaved_requests_expired_total", "Requests dropped unapplied: their client's deadline "
                  "passed while they waited in the daemon.", s.expired)
    yield gauge("autosaved_jobs", "Jobs held by the daemon.", len(s.jobs))
    if s.remote is not None:
        yield from _remote_families(s.remote)
    if s.cache is not None:
        yield gauge("autosaved_state_cache_bytes", "Estimated memory of the jobs' resident state trees.",
                    s.cache.nbytes)
        yield gauge("autosaved_state_cache_limit_bytes", "memory_limit: what the state cache may hold.",
                    s.cache.limit)
        yield counter("autosaved_state_cache_hits_total", "Requests that found their job's tree resident.",
                      s.cache.hits)
        yield counter("autosaved_state_cache_loads_total", "Job trees loaded from disk into the state cache.",
                      s.cache.loads)
        yield counter("autosaved_state_cache_evictions_total", "Job trees evicted to their root.",
                      s.cache.evictions)
    yield from s.durations.collect()
    if s.log_sync_durations is not None:
        yield from s.log_sync_durations.collect()

    def per_job(family: GaugeMetricFamily | CounterMetricFamily,
                get: Callable[[JobSample], float | None]) -> GaugeMetricFamily | CounterMetricFamily:
        for j in s.jobs:
            value = get(j)
            if value is not None:
                family.add_metric([j.job, str(j.owner)], value)
        return family

    labels = ["job", "owner"]
    yield per_job(CounterMetricFamily("autosaved_job_saves_total", "Versions committed per job.", labels=labels),
                  lambda j: j.saves)
    yield per_job(CounterMetricFamily("autosaved_job_written_bytes_total", "Bytes written per job.", labels=labels),
                  lambda j: j.bytes_written)
    yield per_job(GaugeMetricFamily("autosaved_job_dirty_bytes", "Bytes accepted but not yet in a committed version.",
                                    labels=labels), lambda j: j.dirty_bytes)
    yield per_job(GaugeMetricFamily("autosaved_job_held_bytes", "Bytes of state the daemon holds in memory per job.",
                                    labels=labels), lambda j: j.held_bytes)
    yield per_job(GaugeMetricFamily("autosaved_job_state_bytes",
                                    "Encoded size of the job's current state (what quota.max_bytes counts).",
                                    labels=labels), lambda j: j.state_bytes)
    yield per_job(GaugeMetricFamily("autosaved_job_consecutive_save_failures", "Failed saves since the last good one.",
                                    labels=labels), lambda j: j.consecutive_failures)
    yield per_job(GaugeMetricFamily("autosaved_job_saving", "1 while a save of the job is in progress.",
                                    labels=labels), lambda j: 1 if j.saving else 0)
    yield per_job(GaugeMetricFamily("autosaved_job_last_save_timestamp_seconds",
                                    "Wall time of the newest committed version.", labels=labels),
                  lambda j: _epoch(j.last_save_time))


def _remote_families(r: RemoteSample) -> Iterator[Metric]:
    yield CounterMetricFamily("autosaved_upload_bytes_total", "Bytes of chunks sent to the remote store.",
                              value=r.bytes_uploaded)
    yield CounterMetricFamily("autosaved_upload_errors_total",
                              "Failed uploads, catch-ups and lease renewals (each retry counts).",
                              value=r.upload_errors)
    yield GaugeMetricFamily("autosaved_upload_backlog_bytes",
                            "Bytes of committed versions not yet uploaded, all jobs (fenced ones excluded).",
                            value=sum(j.backlog_bytes for j in r.replicas if not j.fenced))
    labels = ["job", "owner"]
    backlog = GaugeMetricFamily("autosaved_job_upload_backlog_bytes",
                                "Bytes of committed versions not yet uploaded, per job.", labels=labels)
    replicated = GaugeMetricFamily("autosaved_job_replicated_version",
                                   "Newest version of the job in the remote store.", labels=labels)
    fenced = GaugeMetricFamily("autosaved_job_fenced", "1 once another host took the job over (uploads stop).",
                               labels=labels)
    for j in r.replicas:
        key = [j.job, str(j.owner)]
        backlog.add_metric(key, j.backlog_bytes)
        if j.replicated is not None:
            replicated.add_metric(key, j.replicated)
        fenced.add_metric(key, 1 if j.fenced else 0)
    yield backlog
    yield replicated
    yield fenced


class _SampleCollector(Collector):
    def __init__(self, sample: Callable[[], Sample]) -> None:
        self.sample = sample

    def collect(self) -> Iterable[Metric]:
        return families(self.sample())


def _registry(sample: Callable[[], Sample]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SampleCollector(sample))
    return registry


def render(s: Sample) -> str:
    """The exposition text of one sample."""
    return prometheus_client.generate_latest(_registry(lambda: s)).decode()


def _response(status: str, body: str, content_type: str = "text/plain; charset=utf-8") -> bytes:
    data = body.encode()
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + data


# ``/healthz``: (healthy, why) from the daemon, read on the event loop.
Health = Callable[[], tuple[bool, str]]


async def _handle(stream: anyio.abc.ByteStream, sample: Callable[[], Sample], health: Health) -> None:
    # An error escaping a handler would end serve(), and with it the daemon: it must end this request only.
    try:
        point("task", "metrics", "before")
        await _answer(stream, sample, health)
    except Exception:
        log.exception("metrics request failed")
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await stream.aclose()


async def _answer(stream: anyio.abc.ByteStream, sample: Callable[[], Sample], health: Health) -> None:
    async with stream:
        request = b""
        with anyio.move_on_after(5):
            while b"\r\n\r\n" not in request and b"\n\n" not in request and len(request) < MAX_REQUEST:
                try:
                    request += await stream.receive(MAX_REQUEST)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        parts = request.split(b"\r\n", 1)[0].split()
        path = parts[1].split(b"?", 1)[0] if len(parts) >= 2 else b""
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            reply = _response("400 Bad Request", "expected GET /metrics or GET /healthz\n")
        elif path == b"/healthz":
            ok, why = health()
            reply = _response("200 OK" if ok else "503 Service Unavailable", why + "\n")
        elif path != b"/metrics":
            reply = _response("404 Not Found", "the metrics are at /metrics, the health check at /healthz\n")
        else:
            snapshot = sample()  # on the event loop; the text is made in a worker thread
            reply = _response("200 OK", await anyio.to_thread.run_sync(render, snapshot), CONTENT_TYPE)
        if parts[:1] == [b"HEAD"]:
            reply = reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await stream.send(reply)


async def open_metrics(host: str, port: int) -> anyio.abc.Listener[anyio.abc.SocketStream]:
    """Bind the endpoint; before the daemon's task group starts, so a busy port is a plain startup error."""
    try:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port)
    except OSError as exc:
        raise AutosavedError(f"metrics_address: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    log.info("metrics endpoint listening address=http://%s:%d/metrics", host, port)
    return listener


async def serve_metrics(listener: anyio.abc.Listener[anyio.abc.SocketStream], sample: Callable[[], Sample],
                        max_conns: int = 256, health: Health = lambda: (True, "serving")) -> None:
    """Serve until cancelled. The port is open to every local user: connections are capped and an
    ``accept()`` failure (``EMFILE`` under a flood of idle connections) backs off instead of ending it."""
    from .accept import serve_capped

    await serve_capped(listener, lambda stream: _handle(stream, sample, health), max_conns=max_conns, name="metrics")
