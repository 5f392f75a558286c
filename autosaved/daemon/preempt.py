"""Spot/preemption notices from the cloud's instance metadata service.

A notice arrives before the SIGTERM (AWS: two minutes; GCP and Azure: about 30 s), so starting the
deadline flush on the notice wins the whole warning period. The HTTP shapes:

- **AWS** (IMDSv2): ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` returns a
  token; ``GET /latest/meta-data/spot/instance-action`` with ``X-aws-ec2-metadata-token`` answers 404
  until a stop/terminate/hibernate is scheduled, then 200 ``{"action": "terminate", "time": "..."}``.
- **GCP**: ``GET /computeMetadata/v1/instance/preempted`` with ``Metadata-Flavor: Google`` answers
  ``FALSE`` or ``TRUE`` (and the response carries ``Metadata-Flavor: Google``).
- **Azure** (Scheduled Events): ``GET /metadata/scheduledevents?api-version=2020-07-01`` with
  ``Metadata: true`` answers ``{"DocumentIncarnation": n, "Events": [...]}``; an event with
  ``"EventType": "Preempt"`` is the notice.

Parsing is pure (``parse_*``); :class:`MetadataWatcher` does the blocking HTTP (stdlib only) and runs in
a worker thread; :func:`watch` is the daemon's polling loop.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.to_thread

from ..settings import PreemptionSettings

log = logging.getLogger("autosaved.preempt")
daemon_log = logging.getLogger("autosaved.daemon")  # the loop's lines read as the daemon's, as they always did

DEFAULT_ENDPOINTS = {
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
    "azure": "http://169.254.169.254",
}
AWS_TOKEN_TTL_S = 21600
HTTP_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Notice:
    provider: str
    detail: str


def parse_aws(status: int, body: bytes) -> Notice | None:
    if status == 404:
        return None
    if status != 200:
        raise ValueError(f"AWS spot/instance-action answered HTTP {status}")
    doc = json.loads(body)
    if not isinstance(doc, dict) or "action" not in doc:
        raise ValueError(f"AWS spot/instance-action: unexpected body {body[:200]!r}")
    return Notice("aws", f"spot instance-action {doc['action']} at {doc.get('time', '?')}")


def parse_gcp(status: int, body: bytes, flavor: str | None) -> Notice | None:
    if status != 200 or flavor != "Google":
        raise ValueError(f"GCP instance/preempted answered HTTP {status} (Metadata-Flavor {flavor!r})")
    value = body.decode(errors="replace").strip().upper()
    if value == "TRUE":
        return Notice("gcp", "instance/preempted is TRUE")
    if value == "FALSE":
        return None
    raise ValueError(f"GCP instance/preempted: unexpected body {body[:200]!r}")


def parse_azure(status: int, body: bytes) -> Notice | None:
    if status != 200:
        raise ValueError(f"Azure scheduledevents answered HTTP {status}")
    doc = json.loads(body)
    events = doc.get("Events") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise ValueError(f"Azure scheduledevents: unexpected body {body[:200]!r}")
    for event in events:
        if isinstance(event, dict) and event.get("EventType") == "Preempt":
            return Notice("azure", f"scheduled event Preempt {event.get('EventId', '?')} "
                                   f"not before {event.get('NotBefore', '?')}")
    return None


class MetadataWatcher:
    """One blocking ``check()`` per poll; raises ``OSError``/``ValueError`` when the service misbehaves."""

    def __init__(self, provider: str, endpoint: str | None = None, timeout: float = HTTP_TIMEOUT_S) -> None:
        if provider not in DEFAULT_ENDPOINTS:
            raise ValueError(f"unknown preemption provider {provider!r}")
        self.provider = provider
        self.base = (endpoint or DEFAULT_ENDPOINTS[provider]).rstrip("/")
        self.timeout = timeout
        self._aws_token: str | None = None
        # The metadata service is link-local: never send these requests through an HTTP proxy.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes, Any]:
        req = urllib.request.Request(self.base + path, method=method, headers=headers)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read(), exc.headers

    def check(self) -> Notice | None:
        if self.provider == "aws":
            return self._check_aws()
        if self.provider == "gcp":
            status, body, headers = self._request(
                "GET", "/computeMetadata/v1/instance/preempted", {"Metadata-Flavor": "Google"})
            return parse_gcp(status, body, headers.get("Metadata-Flavor") if headers else None)
        status, body, _ = self._request("GET", "/metadata/scheduledevents?api-version=2020-07-01", {"Metadata": "true"})
        return parse_azure(status, body)

    def _check_aws(self) -> Notice | None:
        for _ in range(2):  # a second try with a fresh token when the old one expired (401)
            if self._aws_token is None:
                status, body, _ = self._request(
                    "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)})
                if status != 200:
                    raise ValueError(f"AWS IMDSv2 token request answered HTTP {status}")
                self._aws_token = body.decode().strip()
            status, body, _ = self._request(
                "GET", "/latest/meta-data/spot/instance-action", {"X-aws-ec2-metadata-token": self._aws_token})
            if status == 401:
                self._aws_token = None
                continue
            return parse_aws(status, body)
        raise ValueError("AWS IMDSv2 rejected a fresh token (HTTP 401)")


async def watch(settings: PreemptionSettings, on_notice: Callable[[Notice], Awaitable[None]]) -> None:
    """Poll the instance metadata until a spot/preemption notice comes, then hand it to ``on_notice``."""
    watcher = MetadataWatcher(settings.provider, settings.endpoint)
    daemon_log.info("watching %s instance metadata at %s for preemption notices", settings.provider, watcher.base)
    last_error = None
    while True:
        try:
            notice = await anyio.to_thread.run_sync(watcher.check, abandon_on_cancel=True)
        except (OSError, ValueError) as exc:
            notice = None
            if str(exc) != last_error:  # once per distinct problem, not once per poll
                daemon_log.warning("preemption watcher: %s", exc)
                last_error = str(exc)
        if notice is not None:
            await on_notice(notice)
            return
        await anyio.sleep(settings.poll_interval)
