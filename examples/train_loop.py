"""A PyTorch training loop that survives SIGKILL: it sends its full training state to autosaved after
every step and, when started again, resumes bit-identically from what the daemon kept.

    autosaved serve &                       # or the systemd service
    python examples/train_loop.py --steps 200
    # kill -9 it at any moment, start it again: it resumes at the last acknowledged step

With ``pip install 'autosaved[torch]'``; without torch installed it runs the numpy trainer of
``autosaved demo`` instead.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import autosaved

try:
    import torch
    from torch import nn
except ImportError:  # pragma: no cover - exercised on machines without torch
    torch = None


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.7)
    return model, optimizer, scheduler


def digest(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.numpy().tobytes())
    for per_param in optimizer.state_dict()["state"].values():
        for v in per_param.values():
            h.update(v.numpy().tobytes())
    h.update(torch.get_rng_state().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="train-loop")
    parser.add_argument("--address", help="daemon address (default: the local daemon)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep per step (to have time to kill)")
    args = parser.parse_args()
    if torch is None:
        from autosaved.bench.trainer import main as numpy_main

        address = ["--address", args.address] if args.address else []
        return numpy_main(["--job", args.job, "--steps", str(args.steps), *address])

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    model, optimizer, scheduler = build()
    step = 0
    with autosaved.Client(args.job, address=args.address) as ckpt:
        state = ckpt.restore(tensors="torch")
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            step = state["step"]
        print(f"{'resumed' if state else 'started'} at step {step}", flush=True)
        model.train()
        while step < args.steps:
            x = torch.randn(16, 8)
            y = x.sum(dim=1, keepdim=True)
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            ckpt.update(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": step},
                step=step, meta={"loss": loss.item()},
            )
            print(f"step {step} loss {loss.item():.6f}", flush=True)
            time.sleep(args.delay)
    print(f"done step {step} digest {digest(model, optimizer)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
