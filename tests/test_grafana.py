"""``examples/grafana/autosaved.json`` (issue 22): importable as it is, and every metric it names is one a
real daemon exports (scraped from ``metrics_address`` after saves, logged updates and an upload to a real
SeaweedFS, so that the upload metrics exist)."""

from __future__ import annotations

import json
import re
import secrets
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import autosaved
from autosaved.testing.private import PrivateDaemon

from .test_metrics import _free_port
from .test_replication import remote_config, s3env  # noqa: F401  (the fixture: a real SeaweedFS)

DASHBOARD = Path(__file__).resolve().parent.parent / "examples" / "grafana" / "autosaved.json"


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("expr", "definition") and isinstance(v, str)] + \
            [e for v in node.values() for e in _exprs(v)]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def test_the_dashboard_is_importable_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "autosaved" and dash["uid"] and dash["schemaVersion"] >= 30
    assert dash["__inputs"][0]["pluginId"] == "prometheus"  # Grafana asks for the data source on import
    titles = {p["title"] for p in dash["panels"]}
    for wanted in ("Saves per second", "Bytes written by saves", "Save duration (p50, p99)",
                   "Unsaved (dirty) bytes per job", "Write-ahead log syncs", "Failing jobs and errors",
                   "Upload backlog", "Upload bytes per second", "Upload errors", "Replicated version and fenced jobs"):
        assert wanted in titles, titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]


def test_every_metric_the_dashboard_names_is_exported(s3env: Any,  # noqa: F811
                                                      make_daemon: Callable[..., PrivateDaemon]) -> None:
    port = _free_port()
    d = make_daemon(f'metrics_address = "127.0.0.1:{port}"\n' + remote_config(s3env, f"graf-{secrets.token_hex(3)}"))
    with autosaved.Client("graf", address=d.address, save_timeout=60) as c:
        c.update({"w": b"x" * 1000}, wait="logged")
        c.save()
        c.update({"w": b"y" * 1000}, wait="replicated")  # an upload: the upload metrics, a replicated version
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    exported = {re.split(r"[{ ]", line)[0] for line in text.splitlines() if line and not line.startswith("#")}
    named = {m for e in _exprs(json.loads(DASHBOARD.read_text())) for m in re.findall(r"\bautosaved_[a-z0-9_]+", e)}
    assert named, "the dashboard names no metric"
    missing = sorted(named - exported)
    assert not missing, f"the dashboard names metrics the daemon does not export: {missing}"
