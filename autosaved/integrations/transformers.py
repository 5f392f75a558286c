"""Hugging Face ``Trainer``: checkpoint every step through the daemon, resume with the Trainer's own idiom.

    from autosaved.integrations.transformers import AutosavedCallback, resume_from
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[AutosavedCallback("my-run")])
    trainer.train(resume_from_checkpoint=resume_from("my-run", args.output_dir))

:class:`AutosavedCallback` sends, in ``on_step_end`` of every ``every_n_steps``-th optimizer step, what the
Trainer itself puts into a ``checkpoint-N`` folder: the model's state dict, the optimizer's, the LR
scheduler's, the grad scaler's (when mixed precision uses one), the ``TrainerState`` (with the
``TrainerControl`` state, as ``_save_checkpoint`` records it) and the RNG states (python, numpy, torch CPU,
and CUDA per device where present). The update is one copy of the tensors into shared memory; the daemon
writes them out on its own schedule, incrementally. ``wait`` is the SDK's ack level.

:func:`resume_from` turns the job's newest state (from the daemon, or from the state dir when the daemon is
down) into a standard ``checkpoint-<step>`` folder that ``trainer.train(resume_from_checkpoint=...)``
accepts unchanged, so every Trainer feature that reads checkpoints keeps working: weights as safetensors,
``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state.pth``, ``trainer_state.json`` and the model's
``config.json``. It returns ``None`` for a job with no state, so one script serves the first run and every
resume.

Exactness: the state is taken in ``on_step_end`` of step k, before the Trainer logs step k, exactly as its
own save at step k would see weights, optimizer, scheduler and RNG. A run killed in or after that callback
resumes at step k and trains step k+1 onward bit-identically (CPU); step k's own log line, not yet written
when the state was taken, is the one entry the resumed log history lacks (as with Hugging Face's own
``test_can_resume_training``). Not carried: ``training_args.bin`` (the resuming script passes its own
arguments) and the states of other ``ExportableState`` callbacks (the Trainer restores those only with
``restore_callback_states_from_checkpoint``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..client import Client
from ..errors import DaemonUnavailable
from ..offline import restore as offline_restore

__all__ = ["AutosavedCallback", "resume_from"]

FORMAT = 1


def _rng_states() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, keys, int(pos), int(has_gauss), float(cached)),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        # Every device's generator, as the Trainer's distributed save does: a superset of the single one.
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def _check_tensors(tree: Any, path: str) -> None:
    """A clear error naming the path for anything the daemon cannot store, before anything is sent."""
    if isinstance(tree, Mapping):
        for key, value in tree.items():
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(f"{path}: key {key!r} ({type(key).__name__}) cannot be stored; keys must be str or int")
            _check_tensors(value, f"{path}.{key}")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            _check_tensors(value, f"{path}[{i}]")
    elif not isinstance(tree, (torch.Tensor, np.ndarray, str, int, float, bool, bytes, type(None))):
        raise TypeError(f"{path}: a {type(tree).__name__} cannot be stored by autosaved")


class AutosavedCallback(TrainerCallback):
    """Checkpoint the Trainer's full state into autosaved job ``job`` every ``every_n_steps`` optimizer steps."""

    def __init__(self, job: str, *, every_n_steps: int = 1, address: str | None = None,
                 wait: str = "accepted") -> None:
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, not {every_n_steps!r}")
        self.job = job
        self.every_n_steps = every_n_steps
        self.wait = wait
        self.client = Client(job, address=address)
        self.last_ack: Any = None

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:
        if args.process_index == 0:
            self.client.connect()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        if state.global_step % self.every_n_steps or args.process_index != 0:
            return
        model, optimizer, scheduler = kwargs.get("model"), kwargs.get("optimizer"), kwargs.get("lr_scheduler")
        if model is None or optimizer is None:
            raise RuntimeError("AutosavedCallback needs the model and optimizer the Trainer passes to callbacks")
        snapshot = copy.deepcopy(state)  # the Trainer's own save records the control state into its copy
        # stateful_callbacks is typed as a list but is a name → state mapping once the Trainer built it
        cast(dict[str, Any], snapshot.stateful_callbacks)["TrainerControl"] = control.state()
        # unwrap: accelerate wraps the optimizer; its scaler is the Trainer's grad scaler when there is one
        scaler = getattr(optimizer, "scaler", None)
        inner = getattr(optimizer, "optimizer", optimizer)
        config = getattr(model, "config", None)
        delta: dict[str, Any] = {
            "format": FORMAT,
            "model": model.state_dict(),
            "optimizer": inner.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": _rng_states(),
            "trainer_state": json.dumps(dataclasses.asdict(snapshot), sort_keys=True),
            "config": config.to_json_string() if config is not None and hasattr(config, "to_json_string") else None,
        }
        try:
            self.last_ack = self.client.update(delta, step=state.global_step, wait=self.wait)
        except TypeError as exc:
            _check_tensors(delta, "state")  # names the offending path; otherwise re-raise the original
            raise exc

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        self.client.close()


def _newest(job: str, address: str | None, state_dir: str | Path | None, timeout: float) -> Any:
    try:
        # hello first (the context manager): the daemon then replays its write-ahead log for the job
        with Client(job, address=address, timeout=timeout) as client:
            return client.restore(tensors="torch")
    except DaemonUnavailable:
        return offline_restore(job, state_dir=state_dir, tensors="torch")


def resume_from(job: str, output_dir: str | os.PathLike[str], *, address: str | None = None,
                state_dir: str | Path | None = None, timeout: float = 10.0) -> str | None:
    """Write job ``job``'s newest state as ``<output_dir>/checkpoint-<step>`` and return that path (for
    ``trainer.train(resume_from_checkpoint=...)``); ``None`` when the job has no state yet. Reads from the
    daemon at ``address``, or, when no daemon answers within ``timeout`` seconds, from ``state_dir`` (default:
    the discovered one)."""
    from safetensors.torch import save_file

    state = _newest(job, address, state_dir, timeout)
    if not state or "trainer_state" not in state:
        return None
    if state.get("format") != FORMAT:
        raise ValueError(f"job {job!r} does not hold an AutosavedCallback state (format {state.get('format')!r})")
    trainer_state = json.loads(state["trainer_state"])
    step = int(trainer_state["global_step"])
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / f"checkpoint-{step}"
    # Written aside and renamed: a kill while writing never leaves a half checkpoint the Trainer would take.
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=out))
    try:
        weights = {k: v.contiguous() for k, v in state["model"].items()}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if state.get("config"):
            (tmp / "config.json").write_text(state["config"])
        torch.save(state["optimizer"], tmp / "optimizer.pt")
        if state.get("scheduler") is not None:
            torch.save(state["scheduler"], tmp / "scheduler.pt")
        if state.get("scaler") is not None:
            torch.save(state["scaler"], tmp / "scaler.pt")
        rng = dict(state["rng"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        rng["numpy"] = (kind, np.asarray(keys.numpy() if isinstance(keys, torch.Tensor) else keys, dtype=np.uint32),
                        pos, has_gauss, cached)
        if "cuda" in rng:
            rng["cuda"] = list(rng["cuda"])
        torch.save(rng, tmp / "rng_state.pth")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)
