"""``examples/kubernetes/`` (issue 22): the manifests are valid against a current Kubernetes schema
(``kubernetes-validate``, which ships its schemas: no network), and they agree with autosaved's own config:
the ConfigMap's TOML loads, the grace period covers ``shutdown_deadline``, the liveness probe hits
``/healthz`` on ``metrics_address``'s port, and the trainer reaches the socket through ``socket_group``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from autosaved.config import Config, parse_config_table

ROOT = Path(__file__).resolve().parent.parent / "examples" / "kubernetes"
# The newest Kubernetes version whose schemas the pinned kubernetes-validate ships.
K8S_VERSION = kubernetes_validate.latest_version()
FILES = sorted(ROOT.glob("*.yaml"))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all() -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for p in FILES for d in _docs(p)}


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_manifests_are_valid_kubernetes(path: Path) -> None:
    docs = _docs(path)
    assert docs
    for doc in docs:
        # strict: an unknown or misplaced field is an error too, not only a missing required one.
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_broken_manifest_is_caught() -> None:
    """The check above can fail: a misspelt field is refused."""
    ds = _all()["DaemonSet"]
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 40
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_the_manifests_agree_with_the_daemons_config() -> None:
    kinds = _all()
    raw = tomllib.loads(kinds["ConfigMap"]["data"]["autosaved.toml"])
    # autosaved's own validation: no unknown or bad key.
    config = parse_config_table(raw, Config(address="ipc:///unset", state_dir=Path("/unset")))
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    daemon = pod["containers"][0]
    # The flush on SIGTERM fits in the grace period, with room for the exit.
    assert pod["terminationGracePeriodSeconds"] >= config.shutdown_deadline + 10
    assert config.metrics_address is not None
    port = {p["name"]: p["containerPort"] for p in daemon["ports"]}["metrics"]
    assert port == config.metrics_address[1]
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    # The state dir and the socket dir are the host's, shared with trainer pods.
    mounts = {m["mountPath"]: m["name"] for m in daemon["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    sock_dir = str(Path(config.address.removeprefix("ipc://")).parent)
    assert volumes[mounts[str(config.state_dir)]]["hostPath"]["path"] == str(config.state_dir)
    assert volumes[mounts[sock_dir]]["hostPath"]["path"] == sock_dir
    assert volumes[mounts["/etc/autosaved"]]["configMap"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    trainer = kinds["Pod"]["spec"]
    assert config.socket_group in trainer["securityContext"]["supplementalGroups"]
    env = {e["name"]: e["value"] for e in trainer["containers"][0]["env"]}
    assert env["AUTOSAVED_ADDRESS"] == config.address
    trainer_mounts = {m["mountPath"]: m["name"] for m in trainer["containers"][0]["volumeMounts"]}
    assert {v["name"]: v for v in trainer["volumes"]}[trainer_mounts[sock_dir]]["hostPath"]["path"] == sock_dir
