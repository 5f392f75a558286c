"""Prometheus text endpoint (``metrics_address``, off by default).

:func:`render` is a pure function of a :class:`Sample` (what the daemon knows at one instant), so the
exposition format is tested without sockets; :func:`serve_metrics` is the I/O edge, a minimal HTTP/1.0
responder on an anyio TCP listener. The standard library's http.server would need a thread of its own
and could not read the daemon's state without locks; this runs on the event loop like everything else.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

import anyio
import anyio.abc

from ..errors import AutosavedError
from ..storage.faults import point

log = logging.getLogger("autosaved.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
MAX_REQUEST = 8192


@dataclass
class Histogram:
    buckets: tuple[float, ...] = DURATION_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


def _epoch(iso: str | None) -> float | None:
    if not iso:
        return None
    try:
        return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def render(s: Sample) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, rows: Iterable[tuple[dict[str, str], float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{text}}} {_num(value)}" if text else f"{name} {_num(value)}")

    def per_job(get: Callable[[JobSample], float | None]) -> list[tuple[dict[str, str], float]]:
        rows = []
        for j in s.jobs:
            value = get(j)
            if value is not None:
                rows.append(({"job": j.job, "owner": str(j.owner)}, value))
        return rows

    metric("autosaved_uptime_seconds", "gauge", "Seconds since the daemon started.", [({}, s.uptime_s)])
    metric("autosaved_requests_total", "counter", "Requests received.", [({}, s.requests)])
    metric("autosaved_request_errors_total", "counter", "Requests answered with an error.",
           [({}, s.request_errors)])
    metric("autosaved_saves_total", "counter", "Versions committed since the daemon started.", [({}, s.saves)])
    metric("autosaved_save_errors_total", "counter", "Saves that failed (they are retried).",
           [({}, s.save_failures)])
    metric("autosaved_written_bytes_total", "counter", "Bytes written by saves (chunks and manifests).",
           [({}, s.bytes_written)])
    metric("autosaved_config_reloads_total", "counter", "Config reloads applied.", [({}, s.reloads)])
    metric("autosaved_config_reload_errors_total", "counter", "Config reloads rejected as invalid.",
           [({}, s.reload_failures)])
    if s.throttle_rate is not None:
        metric("autosaved_throttle_bytes_per_second", "gauge", "Write rate allowed for background saves.",
               [({}, s.throttle_rate)])
    metric("autosaved_jobs", "gauge", "Jobs held by the daemon.", [({}, len(s.jobs))])

    h = s.durations
    out.append("# HELP autosaved_save_duration_seconds Time from snapshot to committed manifest.")
    out.append("# TYPE autosaved_save_duration_seconds histogram")
    cumulative = 0
    for bound, count in zip((*h.buckets, float("inf")), h.counts, strict=True):
        cumulative += count
        out.append(f'autosaved_save_duration_seconds_bucket{{le="{_num(bound)}"}} {cumulative}')
    out.append(f"autosaved_save_duration_seconds_sum {_num(h.total)}")
    out.append(f"autosaved_save_duration_seconds_count {h.count}")

    metric("autosaved_job_saves_total", "counter", "Versions committed per job.", per_job(lambda j: j.saves))
    metric("autosaved_job_written_bytes_total", "counter", "Bytes written per job.",
           per_job(lambda j: j.bytes_written))
    metric("autosaved_job_dirty_bytes", "gauge", "Bytes accepted but not yet in a committed version.",
           per_job(lambda j: j.dirty_bytes))
    metric("autosaved_job_held_bytes", "gauge", "Bytes of state the daemon holds in memory per job.",
           per_job(lambda j: j.held_bytes))
    metric("autosaved_job_consecutive_save_failures", "gauge", "Failed saves since the last good one.",
           per_job(lambda j: j.consecutive_failures))
    metric("autosaved_job_saving", "gauge", "1 while a save of the job is in progress.",
           per_job(lambda j: 1 if j.saving else 0))
    metric("autosaved_job_last_save_timestamp_seconds", "gauge", "Wall time of the newest committed version.",
           per_job(lambda j: _epoch(j.last_save_time)))
    return "\n".join(out) + "\n"


def _response(status: str, body: str, content_type: str = "text/plain; charset=utf-8") -> bytes:
    data = body.encode()
    head = (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n")
    return head.encode() + data


async def _handle(stream: anyio.abc.ByteStream, sample: Callable[[], Sample]) -> None:
    # An error escaping a handler would end serve(), and with it the daemon: it must end this request only.
    try:
        point("task", "metrics", "before")
        await _answer(stream, sample)
    except Exception:
        log.exception("metrics request failed")


async def _answer(stream: anyio.abc.ByteStream, sample: Callable[[], Sample]) -> None:
    async with stream:
        request = b""
        with anyio.move_on_after(5):
            while b"\r\n\r\n" not in request and b"\n\n" not in request and len(request) < MAX_REQUEST:
                try:
                    request += await stream.receive(MAX_REQUEST)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    break
        parts = request.split(b"\r\n", 1)[0].split()
        if len(parts) < 2 or parts[0] not in (b"GET", b"HEAD"):
            reply = _response("400 Bad Request", "expected GET /metrics\n")
        elif parts[1].split(b"?", 1)[0] != b"/metrics":
            reply = _response("404 Not Found", "the metrics are at /metrics\n")
        else:
            reply = _response("200 OK", render(sample()), CONTENT_TYPE)
            if parts[0] == b"HEAD":
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
                        max_conns: int = 256) -> None:
    """Serve until cancelled. The port is open to every local user: connections are capped and an
    ``accept()`` failure (``EMFILE`` under a flood of idle connections) backs off instead of ending it."""
    from .accept import serve_capped

    await serve_capped(listener, lambda stream: _handle(stream, sample), max_conns=max_conns, name="metrics")
