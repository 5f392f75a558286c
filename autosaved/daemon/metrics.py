"""Prometheus endpoint (``metrics_address``, off by default), built on ``prometheus_client``.

The daemon hands over a :class:`Sample` (what it knows at one instant); :func:`families` turns it into
metric families and :func:`render` into exposition text, both pure, so the format is tested without
sockets. :func:`open_metrics` binds ``prometheus_client``'s WSGI app on a threaded server of its own
(the scrape's rendering and socket work stay off the event loop); each scrape asks the event loop for a
fresh :class:`Sample` (``anyio.from_thread``), so the daemon's state is only ever read on its own loop.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread
import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector, CollectorRegistry

from ..errors import AutosavedError

log = logging.getLogger("autosaved.metrics")

CONTENT_TYPE = prometheus_client.exposition.CONTENT_TYPE_PLAIN_0_0_4
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram(prometheus_client.Histogram):
    """Save durations in seconds (time from snapshot to committed manifest). Thread-safe: the writer
    observes from its worker threads. Unregistered: it is reported through :class:`Sample`."""

    def __init__(self) -> None:
        super().__init__("autosaved_save_duration_seconds", "Time from snapshot to committed manifest.",
                         buckets=DURATION_BUCKETS, registry=None)


@dataclass(frozen=True)
class JobSample:
    job: str
    owner: int
    saves: int
    bytes_written: int
    dirty_bytes: int
    held_bytes: int
    consecutive_failures: int
    saving: bool
    last_save_time: str | None


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
    durations: Histogram
    jobs: tuple[JobSample, ...]
    # Pacing rate of background saves in bytes/s, when a throttle is in use.
    throttle_rate: float | None = None


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
    if s.throttle_rate is not None:
        yield gauge("autosaved_throttle_bytes_per_second", "Write rate allowed for background saves.",
                    s.throttle_rate)
    yield gauge("autosaved_jobs", "Jobs held by the daemon.", len(s.jobs))
    yield from s.durations.collect()

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
    yield per_job(GaugeMetricFamily("autosaved_job_consecutive_save_failures", "Failed saves since the last good one.",
                                    labels=labels), lambda j: j.consecutive_failures)
    yield per_job(GaugeMetricFamily("autosaved_job_saving", "1 while a save of the job is in progress.",
                                    labels=labels), lambda j: 1 if j.saving else 0)
    yield per_job(GaugeMetricFamily("autosaved_job_last_save_timestamp_seconds",
                                    "Wall time of the newest committed version.", labels=labels),
                  lambda j: _epoch(j.last_save_time))


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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are routine: not one log line each."""


@dataclass
class MetricsServer:
    """A bound endpoint, not yet serving (see :func:`serve_metrics`)."""

    server: WSGIServer
    # Set by serve_metrics: how a scrape thread gets a Sample from the event loop.
    sample: Callable[[], Sample] | None = None


def _only_metrics(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"the metrics are at /metrics\n"]
        return app(environ, start_response)

    return wsgi


async def open_metrics(host: str, port: int) -> MetricsServer:
    """Bind the endpoint; before the daemon's task group starts, so a busy port is a plain startup error."""
    handle: MetricsServer | None = None
    token = anyio.lowlevel.current_token()

    def sample() -> Sample:
        # Runs in a scrape thread: the daemon's state is read on its own event loop, never here.
        assert handle is not None and handle.sample is not None
        return anyio.from_thread.run_sync(handle.sample, token=token)

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    app = _only_metrics(prometheus_client.make_wsgi_app(_registry(sample)))
    try:
        server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise AutosavedError(f"metrics_address: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    handle = MetricsServer(server)
    log.info("metrics endpoint listening address=http://%s:%d/metrics", host, port)
    return handle


async def serve_metrics(handle: MetricsServer, sample: Callable[[], Sample]) -> None:
    """Serve scrapes from a thread of the endpoint's own until cancelled (the daemon's shutdown)."""
    handle.sample = sample
    thread = threading.Thread(target=handle.server.serve_forever, name="autosaved-metrics", daemon=True)
    thread.start()
    try:
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(handle.server.shutdown)
            handle.server.server_close()
