"""``autosaved bench hf [--n-layer 2 --n-embd 128] [--steps 10] [--json]``: Trainer step time, side by side.

A GPT-2-shaped model built from ``GPT2Config`` (nothing downloaded) trains on random tokens on the CPU in
three modes, one after the other in one process: no checkpoints; ``AutosavedCallback(every_n_steps=1)``
(a private daemon in a temp dir, ``wait="accepted"``); and the Trainer's own ``save_steps=1``. The step time
is the median interval between consecutive ``on_step_end`` calls after two warm-up steps, so it includes
whatever each mode does per step; beside it, the median time spent checkpointing inside a step (the
callback's update; the Trainer's ``_save_checkpoint``) as a fraction of the rest of the step.
Target (issue 11): checkpointing every step through autosaved costs ≤ 5% step time; the Trainer's own
cost is reported beside it. Use ``--n-layer 12 --n-embd 768`` for a GPT-2-small-sized (~124M parameter)
run where memory and time allow.
Needs ``pip install 'autosaved[transformers]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..fmt import Stages
from ..testing.private import PrivateDaemon

POLICY = '[policy]\ninterval = "30s"\nidle = "10s"\nmin_gap = "10s"\n'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--seq", type=int, default=64, help="tokens per sample (default 64)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="steps per mode, two of them warm-up (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _mode(args: argparse.Namespace, root: Path, mode: str, address: str) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    # Both switches: transformers' own bars and the hub's (which draws "Writing model shards").
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with contextlib.suppress(ImportError, AttributeError):
        importlib.import_module("huggingface_hub.utils").disable_progress_bars()

    from ..integrations.transformers import AutosavedCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.marks.append(time.perf_counter())

    class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __init__(self) -> None:
            self.ids = torch.randint(0, 1024, (args.batch * args.steps, args.seq),
                                     generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=max(1, args.n_embd // 64),
                                       vocab_size=1024, n_positions=args.seq, bos_token_id=0, eos_token_id=0))
    params = sum(p.numel() for p in model.parameters())
    clock = Clock()
    # The clock runs last, after the checkpointing callback of its step.
    callbacks: list[Any] = [AutosavedCallback(f"bench-hf-{mode}", address=address)] if mode == "autosaved" else []
    callbacks.append(clock)
    targs = TrainingArguments(
        output_dir=str(root / mode), max_steps=args.steps, per_device_train_batch_size=args.batch,
        report_to=[], use_cpu=True, disable_tqdm=True, log_level="error", logging_strategy="no",
        save_strategy="steps" if mode == "trainer_save" else "no", save_steps=1, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=targs, train_dataset=Tokens(), callbacks=callbacks)
    # The bench prints its own table: no Trainer log dicts on stdout (PrinterCallback, added when tqdm is
    # off) and no "Writing model shards" bars on stderr (issue 22).
    trainer.remove_callback(PrinterCallback)
    # Time spent checkpointing inside each step (the update call; the Trainer's own _save_checkpoint), so
    # the overhead can also be read within one mode, immune to the host's load changing between modes.
    spent: list[float] = []

    def timed(func: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return func(*a, **k)
            finally:
                spent.append(time.perf_counter() - t)
        return wrapper

    if mode == "autosaved":
        callbacks[0].on_step_end = timed(callbacks[0].on_step_end)
    elif mode == "trainer_save":
        trainer._save_checkpoint = timed(trainer._save_checkpoint)  # type: ignore[method-assign]
    trainer.train()
    gaps = [b - a for a, b in zip(clock.marks[2:], clock.marks[3:], strict=False)]
    step = statistics.median(gaps)
    ckpt = statistics.median(spent[3:]) if len(spent) > 3 else 0.0
    return {"params": params, "step_s": round(step, 4), "steps_timed": len(gaps), "checkpoint_s": round(ckpt, 4),
            "in_step_overhead": round(ckpt / max(step - ckpt, 1e-9), 4)}


def run(args: argparse.Namespace) -> int:
    if args.steps < 5:
        raise ConfigError("--steps must be at least 5")
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-hf-") as tmp, \
            PrivateDaemon(Path(tmp) / "daemon", config=POLICY) as daemon:
        stage = Stages("hf")
        result: dict[str, Any] = {}
        for i, m in enumerate(("none", "autosaved", "trainer_save")):
            stage(f"mode {i + 1}/3: {m}, {args.steps} steps")
            result[m] = _mode(args, Path(tmp), m, daemon.address)
        stage.done()
    base = result["none"]["step_s"]
    result["params"] = result["none"]["params"]
    result["autosaved_overhead"] = round(result["autosaved"]["step_s"] / base - 1, 4)
    result["trainer_save_overhead"] = round(result["trainer_save"]["step_s"] / base - 1, 4)
    result["target"] = {"autosaved_overhead": "<= 0.05"}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"GPT-2-shaped model, {result['params'] / 1e6:.1f}M parameters, CPU; median step time over "
          f"{result['none']['steps_timed']} steps per mode")
    print(f"  no checkpoints:                     {base:.4f} s")
    print(f"  AutosavedCallback(every_n_steps=1): {result['autosaved']['step_s']:.4f} s "
          f"({100 * result['autosaved_overhead']:+.1f}%, target <= +5%); inside the step: "
          f"{result['autosaved']['checkpoint_s']:.4f} s = {100 * result['autosaved']['in_step_overhead']:.1f}%")
    print(f"  Trainer save_steps=1:               {result['trainer_save']['step_s']:.4f} s "
          f"({100 * result['trainer_save_overhead']:+.1f}%); inside the step: "
          f"{result['trainer_save']['checkpoint_s']:.4f} s = {100 * result['trainer_save']['in_step_overhead']:.1f}%")
    print("  (a busy host makes the between-mode figures noisy; the inside-the-step ones are read within one mode)")
    return 0
