"""The trainer ``autosaved demo`` runs: a small numpy regression with SGD whose every step depends on
the previous one (weights, RNG state), so a resume is exact only if every piece came back bit-exact.

Run alone: ``python -m autosaved.bench.trainer --job demo --steps 300``.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from typing import Any

import numpy as np

from ..client.sync import Client

FEATURES = 16


def initial_state(seed: int = 7) -> dict[str | int, Any]:
    rng = np.random.default_rng(seed)
    return {"w": np.zeros(FEATURES, dtype=np.float64), "step": 0, "rng": rng.bit_generator.state,
            "losses": [], "config": {"lr": 0.05, "batch": 32, "seed": seed}}


def train_step(state: dict[str | int, Any]) -> dict[str | int, Any]:
    rng = np.random.default_rng()
    rng.bit_generator.state = state["rng"]
    true_w = np.linspace(-1.0, 1.0, FEATURES)
    x = rng.standard_normal((state["config"]["batch"], FEATURES))
    y = x @ true_w + 0.1 * rng.standard_normal(state["config"]["batch"])
    err = x @ state["w"] - y
    w = state["w"] - state["config"]["lr"] * (x.T @ err) / len(y)
    loss = float(np.mean(err**2))
    return {**state, "w": w, "step": state["step"] + 1, "rng": rng.bit_generator.state,
            "losses": [*state["losses"][-9:], loss]}


def digest(state: dict[str | int, Any]) -> str:
    return hashlib.sha256(state["w"].tobytes() + repr(state["rng"]).encode()).hexdigest()[:16]


def reference(steps: int) -> str:
    state = initial_state()
    for _ in range(steps):
        state = train_step(state)
    return digest(state)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", default="demo")
    p.add_argument("--address")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--delay", type=float, default=0.01)
    p.add_argument("--hold-at", type=int, help="after this step is acknowledged, wait to be killed")
    args = p.parse_args(argv)
    with Client(args.job, address=args.address) as ckpt:
        restored = ckpt.restore()
        state = restored if restored else initial_state()
        print(f"{'resumed' if restored else 'started'} at step {state['step']}", flush=True)
        while state["step"] < args.steps:
            state = train_step(state)
            ckpt.update(state, step=state["step"])
            print(f"step {state['step']} loss {state['losses'][-1]:.5f}", flush=True)
            while state["step"] == args.hold_at:
                # The demo kills us here: a kill at a known step, instead of wherever a busy host lets the
                # trainer run on to while the demo reads its output.
                time.sleep(1)
            time.sleep(args.delay)
    print(f"done step {state['step']} digest {digest(state)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
