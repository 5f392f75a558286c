"""Fine-tune a (tiny, built-from-config) GPT-2 with the Hugging Face Trainer, checkpointing every step in
the autosaved daemon; kill it at any point and run it again: it resumes at the last acknowledged step.

    autosaved serve &
    python examples/hf_trainer.py --job gpt2-run --steps 40      # SIGKILL it whenever...
    python examples/hf_trainer.py --job gpt2-run --steps 40      # ...it resumes, same losses and weights

Nothing is downloaded: the model comes from ``GPT2Config`` and the data are random token sequences.
``--die-at K`` SIGKILLs the process in step K's ``on_step_end``, right after autosaved acknowledged it.

Needs ``pip install 'autosaved[transformers]'``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from autosaved.integrations.transformers import AutosavedCallback, resume_from


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class DieAt(TrainerCallback):  # type: ignore[misc]
    """Runs after AutosavedCallback: the update for this step is acknowledged; then a real SIGKILL."""

    def __init__(self, step: int, ckpt: AutosavedCallback) -> None:
        self.step, self.ckpt = step, ckpt

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            print(f"acked step {state.global_step} ({self.ckpt.last_ack.level})", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(a: argparse.Namespace, use_autosaved: bool) -> tuple[dict[int, float], str]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=256, n_positions=32, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)  # dropout: RNG matters
    model = GPT2LMHeadModel(config)
    # The Trainer needs an output dir even with save_strategy="no"; without --output-dir a temp dir that is
    # removed on the way out (the resume folder written into it is not left behind in /tmp either).
    scratch = None if a.output_dir else tempfile.TemporaryDirectory(prefix="hf-example-")
    out = a.output_dir or scratch.name  # type: ignore[union-attr]
    args = TrainingArguments(output_dir=out, max_steps=a.steps, per_device_train_batch_size=4, learning_rate=3e-3,
                             lr_scheduler_type="linear", warmup_steps=3, logging_steps=1, save_strategy="no",
                             report_to=[], seed=42, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                             log_level="error")
    callbacks: list[TrainerCallback] = []
    resume = None
    if use_autosaved:
        ckpt = AutosavedCallback(a.job, every_n_steps=1, address=a.address, wait=a.wait)
        callbacks.append(ckpt)
        if a.die_at is not None:
            callbacks.append(DieAt(a.die_at, ckpt))
        resume = resume_from(a.job, out, address=a.address)
        print("resuming from", resume, flush=True)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(64, 32, 256), callbacks=callbacks)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if resume is not None:
            shutil.rmtree(resume, ignore_errors=True)  # read once at the start of train(); autosaved keeps the state
        if scratch is not None:
            scratch.cleanup()
    return {int(e["step"]): e["loss"] for e in trainer.state.log_history if "loss" in e}, digest(model)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="hf-example")
    p.add_argument("--address", default=None)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--wait", default="accepted", choices=["accepted", "logged", "committed"])
    p.add_argument("--output-dir", default=None)
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--reference", action="store_true", help="then train again without checkpoints, to compare")
    a = p.parse_args()

    losses, weights = train(a, use_autosaved=True)
    print("losses", json.dumps(losses), flush=True)
    print("digest", weights, flush=True)
    if a.reference:
        losses, weights = train(a, use_autosaved=False)
        print("reference-losses", json.dumps(losses), flush=True)
        print("reference-digest", weights, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
