"""Train a small Lightning model that checkpoints every step in the autosaved daemon; kill it at any point
and run the same command again: ``fit(ckpt_path="autosaved://JOB")`` resumes at the last acknowledged step
(and, for a new job, starts from scratch).

    autosaved serve &
    python examples/lightning_train.py --job lit-run --steps 30    # SIGKILL it whenever...
    python examples/lightning_train.py --job lit-run --steps 30    # ...it resumes at the step it had reached

The data loader keeps its position (``state_dict``/``load_state_dict``), so a resume continues with the batch
that follows the last saved step. ``--die-at K`` SIGKILLs the process right after step K was acknowledged.

Needs ``pip install 'autosaved[lightning]'``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from autosaved.integrations.lightning import AutosavedCallback, AutosavedCheckpointIO


class ResumableLoader(DataLoader):  # type: ignore[type-arg]
    """A loader Lightning can put back mid-epoch: it counts the batches it gave out in this epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.given = 0
        self.skip = 0

    def __iter__(self) -> Iterator[Any]:
        self.given = 0
        for i, batch in enumerate(super().__iter__()):
            if i < self.skip:
                continue
            self.given = i + 1
            yield batch
        self.skip = 0

    def state_dict(self) -> dict[str, int]:
        return {"given": self.given}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skip = state["given"]


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        self.first_batch: int | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.first_batch is None:
            self.first_batch = batch_idx
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)}


def digest(module: torch.nn.Module, optimizer: Any, step: int) -> str:
    h = hashlib.sha256(str(step).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode() + t.detach().numpy().tobytes())
    for pid, st in sorted(optimizer.state_dict()["state"].items()):
        for name, t in sorted(st.items()):
            h.update(f"{pid}.{name}".encode() + t.detach().numpy().tobytes())
    return h.hexdigest()[:16]


class Report(pl.Callback):
    """Prints the state at the start and after each acked save (runs after AutosavedCallback)."""

    def __init__(self, die_at: int | None) -> None:
        self.die_at = die_at

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        print(f"start step {trainer.global_step} state {digest(pl_module, trainer.optimizers[0], trainer.global_step)}",
              flush=True)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if pl_module.first_batch is None:  # type: ignore[comparison-overlap]
            print(f"first batch {batch_idx} value {float(batch[0].sum()):.6f}", flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.die_at:
            print(f"acked step {trainer.global_step} state "
                  f"{digest(pl_module, trainer.optimizers[0], trainer.global_step)}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def fit(a: argparse.Namespace, use_autosaved: bool) -> str:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 16, generator=g)
    data = TensorDataset(x, x.sum(dim=1, keepdim=True).sin())
    model = Regressor()
    kwargs: dict[str, Any] = dict(max_steps=a.steps, accelerator="cpu", devices=1, logger=False,
                                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    if use_autosaved:
        io: Any = AutosavedCheckpointIO(a.job, address=a.address, wait=a.wait)
        if a.use_async:
            from lightning.pytorch.plugins.io import AsyncCheckpointIO

            io = AsyncCheckpointIO(io)
        trainer = pl.Trainer(plugins=[io], callbacks=[AutosavedCallback(a.job), Report(a.die_at)], **kwargs)
        trainer.fit(model, ResumableLoader(data, batch_size=8), ckpt_path=f"autosaved://{a.job}")
    else:
        trainer = pl.Trainer(**kwargs)
        trainer.fit(model, ResumableLoader(data, batch_size=8))
    return digest(model, trainer.optimizers[0], trainer.global_step)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default="lightning-example")
    p.add_argument("--address", default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--wait", default="logged", choices=["accepted", "logged", "committed"])
    p.add_argument("--die-at", type=int, default=None)
    p.add_argument("--async", dest="use_async", action="store_true", help="wrap the IO in AsyncCheckpointIO")
    p.add_argument("--reference", action="store_true", help="then train again without checkpoints, to compare")
    a = p.parse_args()
    print("final", fit(a, use_autosaved=True), flush=True)
    if a.reference:
        print("reference", fit(a, use_autosaved=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
