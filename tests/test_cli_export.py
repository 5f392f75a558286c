"""restore --out / export / import / delete through the real CLI against a real daemon; the exported files
are read with the ``safetensors`` package and ``json`` alone."""

from __future__ import annotations

import base64
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY
from .test_e2e import assert_state_equal


def cli(d: PrivateDaemon, *args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "autosaved", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AUTOSAVED_ADDRESS": d.address, "AUTOSAVED_STATE_DIR": str(d.state_dir)})
    if check is not None:
        assert proc.returncode == check, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def same(got: Any, want: Any) -> None:
    """assert_state_equal, with torch tensors and NaN compared bit for bit."""

    def canon(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return ("torch", str(v.dtype), tuple(v.shape), v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        if isinstance(v, float) and math.isnan(v):
            return ("nan",)
        if isinstance(v, dict):
            return {k: canon(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return type(v)(canon(x) for x in v)
        return v

    assert_state_equal(canon(got), canon(want))


def _state(step: int) -> dict[str | int, Any]:
    torch.manual_seed(step)
    return {
        "model": {"fc.weight": torch.randn(4, 3), "fc.bias": torch.randn(3).to(torch.bfloat16),
                  "steps": torch.tensor(step)},
        "optim": {"state": {0: {"exp_avg": (np.arange(6).reshape(2, 3) * step).astype(">f8")}},
                  "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999)}]},
        "rng": torch.get_rng_state(),
        "cplx": np.array([1 + 2j, step], dtype=np.complex64),
        "progress": {"stage": "train", "done": [1, 2], "blob": b"\x00\xffbin", "loss": math.nan},
        "step": step,
    }


@pytest.fixture
def saved(make_daemon: Callable[..., PrivateDaemon]) -> PrivateDaemon:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("ex", address=d.address) as c:
        c.update(_state(1), step=1)
        assert c.save() == 1
        c.update(_state(2), step=2)
        assert c.save() == 2
        c.update({"step": 3, "unsaved": True}, step=3)  # accepted, not committed
    return d


def test_restore_out_is_readable_with_safetensors_and_json_alone(saved: PrivateDaemon, tmp_path: Path) -> None:
    out = tmp_path / "live"
    summary = json.loads(cli(saved, "restore", "ex", "--out", str(out), "--json").stdout)
    assert summary["live"] is True and summary["step"] == 3
    with autosaved.Client("ex", address=saved.address) as c:
        restored = c.restore(tensors="torch")

    tensors = load_file(str(out / "tensors.safetensors"))
    assert set(tensors) == {"model.fc.weight", "model.fc.bias", "model.steps", "optim.state.0.exp_avg", "rng"}
    assert torch.equal(tensors["model.fc.weight"], restored["model"]["fc.weight"])
    assert tensors["model.fc.bias"].dtype == torch.bfloat16
    assert torch.equal(tensors["model.fc.bias"], restored["model"]["fc.bias"])
    assert tensors["model.steps"].shape == () and int(tensors["model.steps"]) == 2
    assert torch.equal(tensors["rng"], restored["rng"])
    # the numpy side of safetensors reads every non-bfloat16 tensor, little-endian and value-equal
    with safe_open(str(out / "tensors.safetensors"), framework="numpy") as f:
        exp_avg = f.get_tensor("optim.state.0.exp_avg")
    assert exp_avg.dtype == np.dtype("<f8") and np.array_equal(exp_avg, np.arange(6).reshape(2, 3) * 2.0)

    plain = json.loads((out / "state.json").read_text())
    assert plain["model"]["fc.weight"] == {"$tensor": "model.fc.weight"}
    assert plain["optim"]["state"]["0"]["exp_avg"] == {"$tensor": "optim.state.0.exp_avg"}
    assert plain["optim"]["param_groups"] == [{"lr": 0.1, "betas": [0.9, 0.999]}]
    assert base64.b64decode(plain["progress"]["blob"]["$bytes"]) == b"\x00\xffbin"
    assert plain["progress"]["loss"] == {"$float": "nan"}
    cplx = plain["cplx"]["$ndarray"]
    assert np.array_equal(np.frombuffer(base64.b64decode(cplx["base64"]), dtype=cplx["dtype"]),
                          np.array([1 + 2j, 2], dtype=np.complex64))
    assert plain["step"] == 3 and plain["unsaved"] is True


def test_step_and_version_pick_stored_versions_and_export_import_round_trips(
    saved: PrivateDaemon, tmp_path: Path,
) -> None:
    by_step = json.loads(cli(saved, "restore", "ex", "--step", "1", "--out", str(tmp_path / "s1"), "--json").stdout)
    assert by_step["version"] == 1 and by_step["live"] is False
    w1 = load_file(str(tmp_path / "s1" / "tensors.safetensors"))["model.fc.weight"]
    assert torch.equal(w1, _state(1)["model"]["fc.weight"])  # type: ignore[index]
    assert cli(saved, "restore", "ex", "--step", "9", "--out", str(tmp_path / "nope"), check=3).stderr

    assert json.loads(cli(saved, "save", "ex", "--json").stdout) == {"job": "ex", "version": 3}
    exported = json.loads(cli(saved, "export", "ex", "--out", str(tmp_path / "exp"), "--json").stdout)
    assert exported["version"] == 3 and exported["live"] is False  # the newest *committed* version
    original = autosaved.restore("ex", state_dir=saved.state_dir)

    deleted = json.loads(cli(saved, "delete", "ex", "--json").stdout)
    assert deleted == {"job": "ex", "owner": os.geteuid(), "deleted_versions": 3}
    assert not (saved.state_dir / "jobs" / str(os.geteuid()) / "ex").exists()
    assert "no job named 'ex'" in cli(saved, "delete", "ex", check=3).stderr

    imported = json.loads(cli(saved, "import", str(tmp_path / "exp"), "--same-job", "--json").stdout)
    assert imported["job"] == "ex" and imported["version"] == 1
    back = autosaved.restore("ex", state_dir=saved.state_dir)
    same(back, original)  # exact: tuples, int keys, big-endian and complex dtypes, bytes
    assert back["optim"]["state"][0]["exp_avg"].dtype == np.dtype(">f8")

    # into another job, replacing keys it had that the export lacks
    with autosaved.Client("other", address=saved.address) as c:
        c.update({"junk": 1, "step": 0})
    summary = json.loads(cli(saved, "import", str(tmp_path / "exp"), "--job", "other", "--json").stdout)
    assert summary["removed_keys"] == ["junk"]
    same(autosaved.restore("other", state_dir=saved.state_dir), original)


def test_offline_restore_progress_and_bad_imports(saved: PrivateDaemon, tmp_path: Path) -> None:
    assert saved.stop() == 0  # SIGTERM commits the unsaved step 3 as version 3
    proc = cli(saved, "restore", "ex", "--out", str(tmp_path / "off"), "--progress")
    assert "reading the state dir directly" in proc.stderr and "writing" in proc.stderr and "100%" in proc.stderr
    assert "version 3 (step 3)" in proc.stdout
    saved.start()

    bad = tmp_path / "bad"
    bad.mkdir()
    assert "is not an autosaved export" in cli(saved, "import", str(bad), check=2).stderr
    cli(saved, "export", "ex", "--out", str(bad))
    (bad / "autosaved.json").write_text((bad / "autosaved.json").read_text().replace('"nbytes": 48', '"nbytes": 40'))
    assert "export" in cli(saved, "import", str(bad), check=2).stderr
    assert autosaved.restore("ex", state_dir=saved.state_dir)["step"] == 3  # untouched
    assert cli(saved, "export", "missing", "--out", str(tmp_path / "m"), check=3).stderr


def test_exit_codes_for_other_users_jobs() -> None:
    from autosaved.cli.main import exit_code

    assert (exit_code("forbidden"), exit_code("quota"), exit_code("not_found"), exit_code("unavailable"),
            exit_code("bad_config")) == (4, 4, 3, 1, 2)
