"""The Hugging Face Trainer callback: a run SIGKILLed right after step k's update was acknowledged (and then
the daemon, SIGKILLed too) resumes through ``resume_from`` at step k and ends bit-identical (CPU) to an
uninterrupted run, as Hugging Face's own ``test_can_resume_training`` checks its checkpoints."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import autosaved
from autosaved.integrations.transformers import AutosavedCallback, resume_from
from autosaved.testing.private import PrivateDaemon
from tests.conftest import NO_AUTO_POLICY

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hf_trainer.py"
STEPS = 8


def _run(address: str, *args: str, tmpdir: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"TMPDIR": str(tmpdir)} if tmpdir is not None else {})}
    return subprocess.run([sys.executable, str(EXAMPLE), "--address", address, "--job", "gpt2", "--steps",
                           str(STEPS), *args], capture_output=True, text=True, timeout=300, env=env)


def _fields(out: str) -> dict[str, str]:
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines() if " " in line}


def test_sigkill_after_an_acked_step_resumes_bit_identically(make_daemon: Callable[..., PrivateDaemon],
                                                             tmp_path: Path, seed: int) -> None:
    d = make_daemon(NO_AUTO_POLICY)  # no version is ever saved: the daemon's write-ahead log is all there is
    k = random.Random(seed).randint(2, STEPS - 2)  # the step the trainer is killed after
    killed = _run(d.address, "--die-at", str(k), "--wait", "logged", "--output-dir", str(tmp_path / "out"))
    assert killed.returncode == -9, killed.stderr
    assert f"acked step {k} (logged)" in killed.stdout
    d.kill()
    d.start()
    # No --output-dir: the example's scratch dir, and the checkpoint folder resume_from writes into it, are
    # gone when it exits (issue 22: they were left in the system temp folder).
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    resumed = _run(d.address, "--reference", tmpdir=tmpdir)
    assert resumed.returncode == 0, resumed.stderr
    got = _fields(resumed.stdout)
    assert re.fullmatch(rf"from {re.escape(str(tmpdir))}/hf-example-[^/]+/checkpoint-{k}", got["resuming"]), (k, got)
    # torch itself may leave its compile cache (torchinductor_<user>) in TMPDIR: not the example's
    assert [p for p in tmpdir.iterdir() if not p.name.startswith("torchinductor_")] == []
    losses = {int(s): v for s, v in json.loads(got["losses"]).items()}
    reference = {int(s): v for s, v in json.loads(got["reference-losses"]).items()}
    assert got["digest"] == got["reference-digest"]  # the weights, bit for bit
    # Step k's log line was never written (the kill landed in its on_step_end); every other step matches
    # exactly, those before k from the restored trainer state, those after from the resumed training.
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert losses == {s: v for s, v in reference.items() if s != k}


def test_resume_from_a_job_with_no_state_is_none_and_reads_the_state_dir_without_a_daemon(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    assert resume_from("nothing", tmp_path, address=d.address) is None
    with autosaved.Client("plain", address=d.address) as c:
        c.update({"format": 99, "trainer_state": "{}"}, wait="logged")
    with pytest.raises(ValueError, match="format"):
        resume_from("plain", tmp_path, address=d.address)
    d.kill()  # no daemon: the state dir answers (the newest version plus the write-ahead log)
    assert resume_from("nothing", tmp_path, address=d.address, state_dir=d.state_dir, timeout=1) is None
    with pytest.raises(ValueError, match="format 99"):
        resume_from("plain", tmp_path, address=d.address, state_dir=d.state_dir, timeout=1)


def test_unstorable_state_names_the_path(daemon: PrivateDaemon) -> None:
    cb = AutosavedCallback("bad", address=daemon.address)
    with pytest.raises(ValueError, match="every_n_steps"):
        AutosavedCallback("bad", every_n_steps=0, address=daemon.address)

    class Odd(torch.nn.Linear):
        def state_dict(self, *a: object, **k: object) -> dict[str, object]:  # type: ignore[override]
            return {"weight": self.weight, "extra": object()}

    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=str(daemon.root / "o"), use_cpu=True, report_to=[])
    opt = torch.optim.SGD(Odd(2, 2).parameters(), lr=0.1)
    state = TrainerState()
    state.global_step = 1
    with pytest.raises(TypeError, match=r"state\.model\.extra"):
        cb.on_step_end(args, state, TrainerControl(), model=Odd(2, 2), optimizer=opt, lr_scheduler=None)
