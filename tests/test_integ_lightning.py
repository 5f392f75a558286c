"""Lightning: ``AutosavedCheckpointIO`` + ``AutosavedCallback``. A run SIGKILLed right after step k was acked,
and then the daemon SIGKILLed too, resumes with ``fit(ckpt_path="autosaved://JOB")`` at step k, with the
batch after step k's, with weights, optimizer state and loop progress equal to what was acked, and ends
where an uninterrupted run ends. Under ``AsyncCheckpointIO`` it resumes from the last save that was acked."""

from __future__ import annotations

import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from autosaved.integrations.lightning import AutosavedCallback, AutosavedCheckpointIO
from autosaved.testing.private import PrivateDaemon
from tests.conftest import NO_AUTO_POLICY

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lightning_train.py"
STEPS = 10


def _start(address: str, job: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(EXAMPLE), "--address", address, "--job", job, "--steps", str(STEPS),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(proc: subprocess.Popen[str], rc: int) -> dict[str, list[str]]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == rc, err[-3000:]
    got: dict[str, list[str]] = {"_stderr": [err]}
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        got.setdefault(word, []).append(rest)
    return got


def test_sigkill_resumes_at_the_acked_step_sync_and_async_io(make_daemon: Callable[..., PrivateDaemon],
                                                             seed: int) -> None:
    d = make_daemon(NO_AUTO_POLICY)  # nothing is ever saved as a version: the write-ahead log is all there is
    k = random.Random(seed).randint(2, STEPS - 2)  # the step the trainer is killed after
    # Both variants at once (two jobs on one daemon): the interpreter start-up dominates this test.
    killed = {"sync": _start(d.address, "lit-sync", "--die-at", str(k)),
              "async": _start(d.address, "lit-async", "--die-at", str(k), "--async")}
    first = {mode: _lines(p, -9) for mode, p in killed.items()}
    for got in first.values():
        assert got["start"] == ["step 0 state " + got["start"][0].split()[-1]]  # a new job starts from scratch
        assert got["acked"][0].startswith(f"step {k} state ")
        # Lightning's own "Restored all states" would be false for a new job (issue 22): it says so instead.
        assert "Restored all states" not in got["_stderr"][0] and "has no checkpoint yet" in got["_stderr"][0]
    d.kill()
    d.start()
    # What the restarted daemon holds for the async job (its background saves may lag the loop by any number
    # of steps on a busy host, down to none acked when the kill came): the resume must start exactly there.
    with AutosavedCheckpointIO("lit-async", address=d.address) as io:
        held = io.load_checkpoint("autosaved://lit-async")
    held_async = int(held["global_step"]) if held else 0
    assert 0 <= held_async <= k
    resumed = {"sync": _start(d.address, "lit-sync", "--reference"),
               "async": _start(d.address, "lit-async")}
    again = {mode: _lines(p, 0) for mode, p in resumed.items()}
    sync = again["sync"]
    assert "Restored all states from the checkpoint at autosaved://lit-sync" in sync["_stderr"][0]
    # Weights, optimizer state and the step: exactly what was acked at step k; then the batch after k's.
    assert sync["start"] == [first["sync"]["acked"][0]], (k, sync["start"], first["sync"]["acked"])
    assert sync["first"][0].startswith(f"batch {k} ")
    assert sync["final"] == sync["reference"]
    # AsyncCheckpointIO: the save of step k may not have been acked when the kill came; the resume starts
    # from the last one that was (held by the daemon), and continues to the same end.
    start_async = int(again["async"]["start"][0].split()[1])
    assert start_async == held_async, (start_async, held_async, k)
    assert again["async"]["first"][0].startswith(f"batch {start_async} ")
    assert again["async"]["final"] == sync["final"]


def test_checkpoint_io_paths_remove_and_errors(daemon: PrivateDaemon, tmp_path: Path) -> None:
    with AutosavedCheckpointIO("io", address=daemon.address) as io:
        assert not io.load_checkpoint("autosaved://io")  # a new job: nothing to restore
        io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(3)}}, "/ckpts/a.ckpt")
        io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.full((3,), 2.0)}}, "/ckpts/b.ckpt")
        assert io.load_checkpoint("autosaved://io")["global_step"] == 2
        a = io.load_checkpoint("/ckpts/a.ckpt")
        assert torch.equal(a["state_dict"]["w"], torch.ones(3))
        io.remove_checkpoint("/ckpts/b.ckpt")
        assert io.load_checkpoint("autosaved://io")["global_step"] == 1  # the newest that is left
        with pytest.raises(FileNotFoundError, match="nor a file"):
            io.load_checkpoint(tmp_path / "missing.ckpt")
        with pytest.raises(TypeError, match="storage_options"):
            io.save_checkpoint({}, "/x", storage_options={"a": 1})
        with pytest.raises(TypeError, match="object"):
            io.save_checkpoint({"global_step": 3, "hparams": {"f": object()}}, "/ckpts/c.ckpt")
        assert io.load_checkpoint("autosaved://io")["global_step"] == 1  # the refused save changed nothing
    # A fresh IO (a new process, say) finds the same saves by path.
    with AutosavedCheckpointIO("io", address=daemon.address) as io:
        assert io.load_checkpoint("/ckpts/a.ckpt")["global_step"] == 1
    with pytest.raises(ValueError, match="every_n_train_steps"):
        AutosavedCallback("io", every_n_train_steps=0)
