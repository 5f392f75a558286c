"""The steps of ``bench train``'s model with no checkpoint at all, one after another: wall and CPU seconds per
step, with float32 denormals flushed or not (issue 21: without, the step grew 3.4x over the first 8 steps,
which made a mode measured one step later look slower).

    python scripts/step_drift.py --steps 8            # denormals as the CPU computes them
    python scripts/step_drift.py --steps 8 --flush    # flushed to zero, as bench train runs
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from autosaved.bench.train import GPT2_SMALL, build_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--flush", action="store_true")
    a = p.parse_args()
    torch.set_flush_denormal(a.flush)
    cfg = GPT2_SMALL
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)  # the bench's model, optimizer and tokens
    out = []
    for _ in range(a.steps):
        t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        tokens = torch.randint(0, cfg.vocab, (2, 65), generator=gen)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
        out.append(f"{time.perf_counter() - t:.2f} s / {cpu:.2f} CPU-s")
    print(("flushed: " if a.flush else "denormals: ") + ", ".join(out))


if __name__ == "__main__":
    main()
