"""The on-disk format is a promise: ``tests/data/store_v1`` (written by the daemon of the first release,
with ``tests/data/make_store_v1.py``) must restore exactly, offline and through the daemon, in every
later build; and a build that meets a newer format refuses it with a clear error and changes nothing."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import autosaved
from autosaved import restore
from autosaved.client.sync import Client
from autosaved.errors import AutosavedError
from autosaved.storage.manifest import READ_FORMATS, UnsupportedFormat, seal
from autosaved.testing.crashsim import deep_merge
from autosaved.testing.private import PrivateDaemon

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_store_v1", DATA / "make_store_v1.py")
assert _spec is not None and _spec.loader is not None
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def expected(job: str) -> dict[Any, Any]:
    state: dict[Any, Any] = {}
    for delta, wait in (gen.model_updates() if job == "model" else gen.agent_updates()):
        if wait != "save":
            state = deep_merge(state, delta)
    return state


def norm(v: Any) -> Any:
    """Comparable: arrays and tensors by dtype, shape and bytes; NaN by repr; tuples stay tuples."""
    if isinstance(v, dict):
        return ("map", sorted(((type(k).__name__, k), norm(s)) for k, s in v.items()))
    if isinstance(v, tuple):
        return ("tuple", [norm(s) for s in v])
    if isinstance(v, list):
        return ("list", [norm(s) for s in v])
    if isinstance(v, np.ndarray):
        return ("nd", v.dtype.str, v.shape, v.tobytes())
    torch = sys.modules.get("torch")  # a tensor exists only where torch was imported
    if torch is not None and isinstance(v, torch.Tensor):
        return ("torch", str(v.dtype), tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
    if isinstance(v, float) and math.isnan(v):
        return ("nan",)
    return (type(v).__name__, v)


def as_torch(state: dict[Any, Any]) -> dict[Any, Any]:
    """The expected state as ``tensors="torch"`` returns it: every array a tensor."""
    torch = pytest.importorskip("torch")  # only the tests that restore tensors need it (a failure in CI)

    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: conv(s) for k, s in v.items()}
        if isinstance(v, list):
            return [conv(s) for s in v]
        if isinstance(v, tuple):
            return tuple(conv(s) for s in v)
        if isinstance(v, np.ndarray):
            return torch.from_numpy(v.copy())
        return v
    return conv(state)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A copy of the fixture with the jobs under the caller's uid."""
    dst = tmp_path / "root" / "state"
    shutil.copytree(DATA / "store_v1" / "jobs" / "0", dst / "jobs" / str(os.geteuid()))
    return dst


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def test_store_v1_restores_exactly_offline(state_dir: Path) -> None:
    pytest.importorskip("torch")  # the fixture's model job holds a bfloat16 tensor
    for job in ("model", "agent"):
        assert norm(restore(job, state_dir=state_dir, tensors="torch")) == norm(as_torch(expected(job)))
    got = restore("model", state_dir=state_dir)
    want = expected("model")
    assert norm({k: v for k, v in got.items() if k != "bf16"}) == norm({k: v for k, v in want.items() if k != "bf16"})
    assert got["step"] == 5 and got["note"] == "after the last version"  # the log records past the last version
    assert got["optim"]["param_groups"][0]["params"] == (0, 1) and 0 in got["optim"]["state"]


def test_store_v1_has_every_feature_it_promises() -> None:
    objects = list((DATA / "store_v1" / "jobs" / "0" / "model" / "objects").rglob("*"))
    assert any(p.suffix == ".zst" for p in objects) and any(p.is_file() and not p.suffix for p in objects)
    manifest = json.loads((DATA / "store_v1" / "jobs" / "0" / "model" / "versions" / "000000000003.json").read_text())
    assert manifest["format"] == 1 and manifest["wal_lsn"] < 5
    assert any(b["dtype"] == "bfloat16" for b in manifest["blobs"])


def test_store_v1_restores_exactly_through_the_daemon(state_dir: Path) -> None:
    pytest.importorskip("torch")
    with PrivateDaemon(state_dir.parent, config=gen.CONFIG) as d:
        for job in ("model", "agent"):
            c = Client(job, address=d.address, timeout=30, save_timeout=60)
            try:
                c.connect()
                assert norm(c.restore(tensors="torch")) == norm(as_torch(expected(job)))
            finally:
                c.close()
        assert d.stop(signal.SIGTERM) == 0
    # What the daemon wrote on the way (a flush of the replayed log) still restores the same, and is format 2
    # (a root record over pages) beside the format-1 versions before it.
    assert norm(restore("model", state_dir=state_dir, tensors="torch")) == norm(as_torch(expected("model")))
    versions = sorted((state_dir / "jobs" / str(os.geteuid()) / "model" / "versions").glob("*.json"))
    formats = [json.loads(p.read_bytes())["format"] for p in versions]
    assert formats[-1] == 2 and 1 in formats, formats


def _bump_manifest(state_dir: Path) -> None:
    path = state_dir / "jobs" / str(os.geteuid()) / "model" / "versions" / "000000000003.json"
    doc = json.loads(path.read_bytes())
    doc.pop("digest")
    doc["format"] = max(READ_FORMATS) + 1  # one past the newest this build reads
    path.write_bytes(seal(doc))


def _bump_log(state_dir: Path) -> None:
    (seg,) = (state_dir / "jobs" / str(os.geteuid()) / "model" / "log").glob("*.wal")
    raw = bytearray(seg.read_bytes())
    assert raw[:4] == b"ASW1"
    raw[3:4] = b"2"
    seg.write_bytes(bytes(raw))


@pytest.mark.parametrize("bump", [_bump_manifest, _bump_log], ids=["manifest", "log"])
def test_a_newer_format_is_refused_clearly_and_nothing_changes(state_dir: Path, bump: Any) -> None:
    bump(state_dir)
    before = tree_digest(state_dir)
    with pytest.raises(UnsupportedFormat, match="newer than this autosaved reads"):
        restore("model", state_dir=state_dir)
    with PrivateDaemon(state_dir.parent, config=gen.CONFIG) as d:
        c = Client("model", address=d.address, timeout=30, save_timeout=60)
        try:
            with pytest.raises(AutosavedError, match="newer than this autosaved reads"):
                c.connect()
                c.restore()
            # gc refuses (a newer manifest) or has nothing it may touch (a newer log): checked below
            with (contextlib.suppress(AutosavedError),
                  autosaved.Admin(address=d.address, timeout=30, save_timeout=60) as admin):
                admin.gc("model")
        finally:
            c.close()
        other = Client("agent", address=d.address, timeout=30)
        try:
            assert norm(other.restore()) == norm(expected("agent"))  # other jobs are served as before
        finally:
            other.close()
        assert d.proc is not None and d.proc.poll() is None
        assert d.stop(signal.SIGTERM) == 0
    after = tree_digest(state_dir)
    model = f"jobs/{os.geteuid()}/model"
    assert {k: v for k, v in after.items() if k.startswith(model)} == \
        {k: v for k, v in before.items() if k.startswith(model)}
