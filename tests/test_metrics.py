"""The Prometheus endpoint: the exposition text (pure) and the live endpoint of a real daemon."""

from __future__ import annotations

import os
import re
import secrets
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import autosaved
from autosaved.daemon.metrics import Histogram, JobSample, Sample, render
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, wait_for
from .test_replication import remote_config, s3env  # noqa: F401  (the fixture: a real SeaweedFS)


def _sample(**over: object) -> Sample:
    h = Histogram()
    for s in (0.03, 0.3, 7.0):
        h.observe(s)
    job = JobSample(job='a"b', owner=1000, saves=2, bytes_written=4096, dirty_bytes=10, held_bytes=20, state_bytes=30,
                    consecutive_failures=0, saving=False, last_save_time="2026-01-01T00:00:00.000Z")
    base = dict(uptime_s=1.5, requests=7, request_errors=1, saves=2, save_failures=1, bytes_written=4096,
                reloads=0, reload_failures=0, task_restarts=0, durations=h, jobs=(job,))
    return Sample(**{**base, **over})  # type: ignore[arg-type]


def values(text: str) -> dict[str, float]:
    """Each sample line's series (name and labels, as written) → its value (``1``, ``1.0`` and
    ``1e+00`` are the same number to Prometheus)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def test_render_is_valid_exposition_text() -> None:
    text = render(_sample())
    got = values(text)
    assert got['autosaved_job_dirty_bytes{job="a\\"b",owner="1000"}'] == 10
    assert got["autosaved_save_errors_total"] == 1
    assert got['autosaved_save_duration_seconds_bucket{le="0.05"}'] == 1
    assert got['autosaved_save_duration_seconds_bucket{le="0.5"}'] == 2
    assert got['autosaved_save_duration_seconds_bucket{le="+Inf"}'] == 3
    assert got["autosaved_save_duration_seconds_count"] == 3
    assert got['autosaved_job_last_save_timestamp_seconds{job="a\\"b",owner="1000"}'] == 1767225600
    assert "autosaved_throttle_bytes_per_second" not in text
    assert values(render(_sample(throttle_rate=1048576.0)))["autosaved_throttle_bytes_per_second"] == 1048576
    # every sample line belongs to a metric declared with HELP and TYPE
    declared = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    for line in text.splitlines():
        if not line.startswith("#"):
            name = re.split(r"[{ ]", line)[0]
            assert re.sub(r"_(bucket|sum|count)$", "", name) in declared, line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_live_endpoint_reports_saves_and_dirty_bytes(make_daemon: Callable[..., PrivateDaemon]) -> None:
    port = _free_port()
    d = make_daemon(f'metrics_address = "127.0.0.1:{port}"\n' + NO_AUTO_POLICY)
    url = f"http://127.0.0.1:{port}/metrics"
    with autosaved.Client("m1", address=d.address) as c:
        c.update({"w": b"x" * 5000}, step=1)
        with urllib.request.urlopen(url, timeout=60) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = resp.read().decode()
        owner = os.geteuid()
        assert values(text)[f'autosaved_job_dirty_bytes{{job="m1",owner="{owner}"}}'] >= 5000
        c.save()
    with urllib.request.urlopen(url, timeout=60) as resp:
        text = resp.read().decode()
    got = values(text)
    assert got[f'autosaved_job_saves_total{{job="m1",owner="{owner}"}}'] == 1
    assert got[f'autosaved_job_dirty_bytes{{job="m1",owner="{owner}"}}'] == 0
    assert got["autosaved_save_duration_seconds_count"] == 1
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=60)
    assert err.value.code == 404


def test_metrics_are_off_by_default_and_a_busy_port_is_a_clear_error(
    make_daemon: Callable[..., PrivateDaemon],
) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    assert "metrics endpoint" not in d.log()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        bad = make_daemon(f'metrics_address = "127.0.0.1:{port}"\n', start=False)
        with pytest.raises(autosaved.AutosavedError, match=rf"metrics_address: cannot listen on 127.0.0.1:{port}"):
            bad.start(timeout=60)


def test_log_syncs_and_quota_refusals_are_exported(make_daemon: Callable[..., PrivateDaemon]) -> None:
    from autosaved.daemon.metrics import log_sync_histogram

    h = log_sync_histogram()
    h.observe(0.002)
    got = values(render(_sample(log_syncs=3, log_sync_durations=h, quota_refusals=2)))
    assert got["autosaved_log_syncs_total"] == 3 and got["autosaved_quota_refusals_total"] == 2
    assert got['autosaved_log_sync_duration_seconds_bucket{le="0.0025"}'] == 1
    # Live: each logged update is one group commit here (one client, one at a time), each one observed.
    port = _free_port()
    d = make_daemon(f'metrics_address = "127.0.0.1:{port}"\n' + NO_AUTO_POLICY)
    with autosaved.Client("w", address=d.address) as c:
        for i in range(3):
            c.update({"i": i}, wait="logged")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        live = values(resp.read().decode())
    assert live["autosaved_log_syncs_total"] >= 1
    assert live["autosaved_log_sync_duration_seconds_count"] == live["autosaved_log_syncs_total"]
    assert live["autosaved_quota_refusals_total"] == 0


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        return values(resp.read().decode())


def test_upload_metrics_render_per_job_and_in_total() -> None:
    from autosaved.daemon.metrics import RemoteSample, ReplicaSample

    assert "autosaved_upload" not in render(_sample())  # no [remote]: no upload series at all
    remote = RemoteSample(bytes_uploaded=5000, upload_errors=2, replicas=(
        ReplicaSample(job="a", owner=1, replicated=4, fenced=False, backlog_bytes=100),
        ReplicaSample(job="b", owner=2, replicated=None, fenced=True, backlog_bytes=70)))
    got = values(render(_sample(remote=remote)))
    assert got["autosaved_upload_bytes_total"] == 5000 and got["autosaved_upload_errors_total"] == 2
    assert got["autosaved_upload_backlog_bytes"] == 100  # a fenced job uploads nothing more: not a backlog
    assert got['autosaved_job_upload_backlog_bytes{job="a",owner="1"}'] == 100
    assert got['autosaved_job_replicated_version{job="a",owner="1"}'] == 4
    assert 'autosaved_job_replicated_version{job="b",owner="2"}' not in got  # nothing in the bucket yet
    assert got['autosaved_job_fenced{job="a",owner="1"}'] == 0 and got['autosaved_job_fenced{job="b",owner="2"}'] == 1


def test_live_throttle_rate_is_exported(make_daemon: Callable[..., PrivateDaemon]) -> None:
    # The sample never carried the rate, so the gauge never appeared even under a cap.
    port = _free_port()
    # The adaptive rate off: the cap alone is the rate, however busy the disk is.
    throttle = '[throttle]\nenabled = false\nmax_write_rate = "64MiB"\n'
    d = make_daemon(f'metrics_address = "127.0.0.1:{port}"\n' + NO_AUTO_POLICY + throttle)
    with autosaved.Client("t", address=d.address) as c:
        c.update({"w": b"x" * 100}, wait="logged")
        assert _scrape(port)["autosaved_throttle_bytes_per_second"] == 64 * 2**20


def test_live_upload_metrics_move_after_an_upload(s3env: Any,  # noqa: F811
                                                  make_daemon: Callable[..., PrivateDaemon]) -> None:
    port = _free_port()
    d = make_daemon(f'metrics_address = "127.0.0.1:{port}"\n'
                    + remote_config(s3env, f"metrics-{secrets.token_hex(3)}"))
    with autosaved.Client("up", address=d.address, save_timeout=60) as c:
        ack = c.update({"w": np.arange(100_000, dtype=np.float32)}, wait="replicated")
    assert ack.level == "replicated" and ack.version is not None
    got, key = _scrape(port), f'{{job="up",owner="{os.geteuid()}"}}'
    assert got["autosaved_upload_bytes_total"] >= 400_000  # the array's chunks went up
    assert got["autosaved_upload_backlog_bytes"] == 0 and got[f"autosaved_job_upload_backlog_bytes{key}"] == 0
    assert got[f"autosaved_job_replicated_version{key}"] == ack.version
    assert got[f"autosaved_job_fenced{key}"] == 0 and got["autosaved_upload_errors_total"] == 0
    # The store down: the next version waits in the backlog and each failed try counts as an error.
    s3env.pause()
    try:
        with autosaved.Client("up", address=d.address, save_timeout=60) as c:
            c.update({"w": np.arange(100_001, dtype=np.float32)}, wait="committed")
        down = wait_for(lambda: (m := _scrape(port))["autosaved_upload_errors_total"] > 0 and m, timeout=30)
        assert down["autosaved_upload_backlog_bytes"] > 0  # type: ignore[index]
        assert down[f"autosaved_job_replicated_version{key}"] == ack.version  # type: ignore[index]
    finally:
        s3env.resume()
    wait_for(lambda: _scrape(port)["autosaved_upload_backlog_bytes"] == 0, timeout=60)
