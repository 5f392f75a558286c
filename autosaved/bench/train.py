"""``autosaved bench train [--small] [--steps 3] [--json]``: checkpoint every step of a real training loop.

A GPT-2-shaped model (GPT-2 small's config: 12 layers, 768 wide, 50257 tokens, 124M parameters; ``--small``:
2 layers, 128 wide, for a quick run) trains on CPU with AdamW on random tokens, once per mode, each with a
checkpoint of ``{"model", "optim", "step"}`` after every optimizer step:

- ``none``: no checkpoint (the baseline);
- ``eager``: ``Client.update(...)`` (returns once every byte is copied into the daemon's slots);
- ``lazy``: ``LazyClient.update(...)`` right after the step, and its fence just before the next step (what
  the optimizer hook does), so the copy overlaps the next forward and backward where a core is spare
  beside torch's threads; where none is, the copy runs at that fence (``copy_at_lazy``);
- ``torch_save``: ``torch.save`` to a file + fsync;
- ``dcp_async``: ``torch.distributed.checkpoint.async_save`` (a one-process gloo group), waiting for the
  previous save before starting the next, as DCP requires.

Each mode runs twice, in mirrored order (none, eager, ..., dcp_async, dcp_async, ..., none), with half of
``--steps`` each time, so a host whose load drifts during the run charges the drift to every mode alike.

Keys: ``step_s_<mode>`` (median wall time of a steady-state step, checkpoint included: the first
``--warmup`` steps of each run, which pay for fresh memory, slot creation and connections, are dropped;
every mode drops at least :data:`MIN_WARMUP`, so that each measures the same training steps: eager's
slots are made in its first :data:`SLOT_WARMUP` steps and lazy's update, slot creation included, runs
during the next step; the model and tokens are seeded alike in every run, and float32 denormals are
flushed to zero, so step k costs the same in every mode: see :data:`MIN_WARMUP`),
``blocking_s_<mode>`` (median time per step the trainer was stopped by the checkpoint: the call itself plus,
for lazy, the fence and, for DCP, the wait for the previous save), ``cpu_s_<mode>`` (median CPU seconds
the trainer process spent per steady-state step, every thread, the lazy copier's included: what the
checkpoint costs in CPU, which the host's load does not inflate the way it inflates wall time),
``minflt_<mode>`` (median minor page faults of the trainer per step: a slot faulted in afresh would show
here as ~size/4 KiB more than ``none``), ``daemon_cpu_s_<mode>`` (the daemon's CPU seconds per step),
``copy_at_lazy`` (where the lazy copy ran: ``overlap`` in the background, or ``fence`` at the next
step's fence, when no core is left over beside torch's threads: :mod:`autosaved.client.lazyplan`),
``background_copies_lazy`` (lazy updates whose copy ran on the background copier during a measured step:
with the copy at the fence, one that no fence reached in time, and that step paid for a copy beside its
compute; 0 is what the fence placement promises),
``alone_s_<eager|lazy>`` (the same
state handed over once more after the loop with nothing else running: ``update`` for eager, ``update`` +
``fence`` for lazy: what the copy costs by itself), and ``state_bytes``. The daemon runs privately in a
temp dir with its save policy off, so ``eager``/``lazy`` measure what the trainer pays for handing its
state over (``accepted``) while ``torch_save``/DCP also write to disk; the daemon's own writes are what
``autosaved bench`` measures.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client.lazy import LazyClient
from ..client.sync import Client
from ..errors import AutosavedError
from ..fmt import Stages, human_bytes, print_json, table
from ..testing.private import PrivateDaemon

MODES = ("none", "eager", "lazy", "torch_save", "dcp_async")
# A client's first two updates of a state each fault a slot in (two alternate from then on: the one the
# daemon holds and the one being written), so a measured step of eager or lazy comes after both. With
# ``--warmup 1`` the measured step made the second slot: +1.65 GB of page faults in it (issue 21, the
# ``minflt`` column: 561k per eager step against 218k for none).
SLOT_WARMUP = 2
# The warm-up every mode drops: lazy's, one more than eager's. Alike for all, so every mode measures the same
# training steps (issue 21: with eager and none after 2 and lazy after 3, lazy measured a step later, and
# this model's step on random tokens grew from 1.06 s at its 4th step to 3.62 s at its 8th, no checkpoint
# at all, as denormal floats reached its matmuls: lazy's "extra" 0.5 s and 0.8 CPU-s per step). The
# denormals are flushed as well (``torch.set_flush_denormal``), which keeps the steps flat (1.0-1.06 s).
MIN_WARMUP = SLOT_WARMUP + 1
_DAEMON_CONFIG = ('[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'
                  '[throttle]\nenabled = false\n')


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 50257
    ctx: int = 1024
    layers: int = 12
    heads: int = 12
    width: int = 768


GPT2_SMALL = GPTConfig()
TINY = GPTConfig(vocab=1024, ctx=128, layers=2, heads=4, width=128)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--small", action="store_true", help="a 2-layer, 128-wide model (quick runs, tests)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per mode, after the warm-up (default 3)")
    p.add_argument("--warmup", type=int, default=MIN_WARMUP,
                   help=f"uncounted steps at the start of each run (default and least: {MIN_WARMUP}, the same for "
                        "every mode)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--batch", type=int, default=2, help="sequences per step (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def build_model(cfg: GPTConfig) -> Any:
    """GPT-2's architecture (pre-norm blocks, causal self-attention, 4x GELU MLP, tied embeddings)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
            self.c_attn, self.c_proj = nn.Linear(cfg.width, 3 * cfg.width), nn.Linear(cfg.width, cfg.width)
            self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(approximate="tanh"),
                                     nn.Linear(4 * cfg.width, cfg.width))

        def forward(self, x: Any) -> Any:
            b, t, c = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(cfg.width, dim=2)
            q, k, v = (z.view(b, t, cfg.heads, c // cfg.heads).transpose(1, 2) for z in (q, k, v))
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(cfg.vocab, cfg.width), nn.Embedding(cfg.ctx, cfg.width)
            self.h = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.ln_f = nn.LayerNorm(cfg.width)
            self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
            self.lm_head.weight = self.wte.weight

        def forward(self, idx: Any) -> Any:
            pos = torch.arange(idx.shape[1])
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            return self.lm_head(self.ln_f(x))

    torch.manual_seed(0)
    return GPT()


def _state(model: Any, opt: Any, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}


def _state_bytes(state: Any) -> int:
    import torch

    if isinstance(state, torch.Tensor):
        return int(state.numel() * state.element_size())
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_state_bytes(v) for v in state)
    return 0


def _usage(daemon: Any) -> tuple[float, int, float]:
    """(this process's CPU seconds, its minor faults, the daemon's CPU seconds): per-step counters that
    a busy host does not stretch the way it stretches wall time."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    theirs = 0.0
    if daemon is not None:
        times = daemon.cpu_times()
        theirs = times.user + times.system
    return own.ru_utime + own.ru_stime, own.ru_minflt, theirs


def run_mode(mode: str, cfg: GPTConfig, steps: int, seq: int, batch: int, work: Path,
             address: str | None, warmup: int = 2, daemon_pid: int | None = None) -> dict[str, Any]:
    import psutil
    import torch

    warmup = max(warmup, MIN_WARMUP)  # the same steps measured in every mode (lazy: update k runs in step k + 1)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    blocked: list[float] = []
    times: list[float] = []
    usage: list[tuple[float, int, float]] = []  # per measured step: trainer CPU s, minor faults, daemon CPU s
    daemon = psutil.Process(daemon_pid) if daemon_pid is not None and mode in ("eager", "lazy") else None
    checkpoint: Callable[[int], None] = lambda _step: None  # noqa: E731
    before_step: Callable[[], None] = lambda: None  # noqa: E731
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    pending_block = [0.0]
    alone: Callable[[], float] | None = None  # one more hand-over of the state, nothing else running
    copy_at: str | None = None  # lazy: where its copy ran (client/lazyplan.py)
    background: Callable[[], int] = lambda: 0  # noqa: E731  (lazy: copies the background copier made)
    background_copies = 0  # ... during the measured steps

    if mode == "eager":
        assert address is not None
        client = Client(f"train-{mode}", address=address, timeout=600)
        client.connect()

        def checkpoint(step: int) -> None:
            client.update(_state(model, opt, step), step=step)

        def alone() -> float:
            t = time.perf_counter()
            client.update(_state(model, opt, -1), step=-1)
            return time.perf_counter() - t

        cleanup = client.close
    elif mode == "lazy":
        assert address is not None
        lazy = LazyClient(Client(f"train-{mode}", address=address, timeout=600))
        lazy.client.connect()

        def checkpoint(step: int) -> None:
            lazy.update(_state(model, opt, step), step=step)

        def before_step() -> None:
            t = time.perf_counter()
            lazy.fence()  # what hook_optimizer does; timed here so it counts as blocking
            pending_block[0] += time.perf_counter() - t

        def alone() -> float:
            lazy.wait()
            t = time.perf_counter()
            lazy.update(_state(model, opt, -1), step=-1)
            lazy.fence()
            return time.perf_counter() - t

        cleanup = lazy.close
        copy_at = lazy.copy_at()

        def background() -> int:
            return lazy.background_copies
    elif mode == "torch_save":
        def checkpoint(step: int) -> None:
            with (work / "ckpt.pt").open("wb") as fh:
                torch.save(_state(model, opt, step), fh)
                fh.flush()
                os.fsync(fh.fileno())
    elif mode == "dcp_async":
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        dist.init_process_group("gloo", init_method=f"file://{work / 'pg'}", rank=0, world_size=1)
        futures: list[Any] = []

        def checkpoint(step: int) -> None:
            if futures:
                futures.pop().result()  # DCP: one async save at a time
            async_save = getattr(dcp, "async_save")  # noqa: B009  (not in torch's stubs' exports)
            futures.append(async_save(_state(model, opt, step), checkpoint_id=str(work / f"dcp{step}")))

        def finish() -> None:
            for f in futures:
                f.result()
            dist.destroy_process_group()

        cleanup = finish

    try:
        for i in range(steps + warmup):
            tokens = torch.randint(0, cfg.vocab, (batch, seq + 1), generator=gen)
            started = time.perf_counter()
            used = _usage(daemon)
            copies = background()
            pending_block[0] = 0.0
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            before_step()
            opt.step()
            t = time.perf_counter()
            checkpoint(i)
            stopped = time.perf_counter() - t + pending_block[0]
            if i >= warmup:  # the first steps pay for fresh memory, connections, slot creation
                times.append(time.perf_counter() - started)
                blocked.append(stopped)
                now = _usage(daemon)
                usage.append((now[0] - used[0], now[1] - used[1], now[2] - used[2]))
                background_copies += background() - copies
            if not math.isfinite(float(loss.detach())):
                raise AutosavedError(f"bench train: loss became {float(loss.detach())}")
        state_bytes = _state_bytes(_state(model, opt, steps))
        before_step()  # the last lazy copy is done before the state is handed over alone
        alones = [alone() for _ in range(2)] if alone is not None else []
    finally:
        cleanup()
    return {"times": times, "blocked": blocked, "alone": alones, "state_bytes": state_bytes, "usage": usage,
            "copy_at": copy_at, "background_copies": background_copies}


def _halves(steps: int) -> tuple[int, int]:
    """Measured steps of a mode's first and second run (the second may be 0: ``--steps 1``)."""
    return (steps + 1) // 2, steps // 2


def measure(cfg: GPTConfig, steps: int, seq: int, batch: int, work: Path,
            warmup: int = MIN_WARMUP) -> dict[str, Any]:
    import torch

    warmup = max(warmup, MIN_WARMUP)
    # Denormal floats made this model's step grow 3.4x over its first 8 steps (see MIN_WARMUP): flushed, a
    # step costs the same whichever step a mode measures. A CPU trainer of its own would want the same.
    flushed = bool(torch.set_flush_denormal(True))
    out: dict[str, Any] = {"host": f"{socket.gethostname()} ({os.cpu_count()} cpus)", "steps": steps,
                           "warmup": warmup, "flush_denormal": flushed,
                           "threads": torch.get_num_threads(), "config": cfg.__dict__, "seq": seq, "batch": batch}
    # Each mode runs twice, in the order A B C ... C B A, half of its steps each time: on a shared host
    # whose load drifts over the minutes of a run, a fixed order charged the drift to whichever mode ran
    # last (issue 21: ``none`` first, lazy third). Mirrored, a linear drift falls on every mode alike.
    first, second = _halves(steps)
    order = [(mode, first) for mode in MODES] + [(mode, second) for mode in reversed(MODES) if second]
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    try:
        with PrivateDaemon(work / "daemon", config=_DAEMON_CONFIG) as daemon:
            stage = Stages("train")
            for i, (mode, n) in enumerate(order):
                stage(f"run {i + 1}/{len(order)}: {mode}, {n} steps")
                runs[mode].append(run_mode(mode, cfg, n, seq, batch, work, daemon.address, warmup,
                                           daemon.proc.pid if daemon.proc is not None else None))
            stage.done()
    finally:
        torch.set_flush_denormal(False)
    for mode, results in runs.items():
        times = [t for r in results for t in r["times"]]
        out[f"step_s_{mode}"] = statistics.median(times)
        out[f"step_mean_s_{mode}"] = statistics.mean(times)
        usage = [u for r in results for u in r["usage"]]
        out[f"cpu_s_{mode}"] = statistics.median(u[0] for u in usage)
        out[f"minflt_{mode}"] = statistics.median(u[1] for u in usage)
        if mode in ("eager", "lazy"):
            out[f"daemon_cpu_s_{mode}"] = statistics.median(u[2] for u in usage)
        if mode != "none":
            out[f"blocking_s_{mode}"] = statistics.median(b for r in results for b in r["blocked"])
        alones = [a for r in results for a in r["alone"]]
        if alones:
            out[f"alone_s_{mode}"] = statistics.median(alones)
        out["state_bytes"] = results[-1]["state_bytes"]
        if results[-1]["copy_at"] is not None:
            out[f"copy_at_{mode}"] = results[-1]["copy_at"]
            out[f"background_copies_{mode}"] = sum(r["background_copies"] for r in results)
    out["params"] = sum(p.numel() for p in build_model(cfg).parameters())
    return out


def render(r: dict[str, Any]) -> str:
    base = r["step_s_none"]
    rows = []
    for mode in MODES:
        block, alone = r.get(f"blocking_s_{mode}"), r.get(f"alone_s_{mode}")
        rows.append([mode, f"{r[f'step_s_{mode}']:.3f}", f"{r[f'step_s_{mode}'] / base:.3f}x",
                     "-" if block is None else f"{block:.4f}", "-" if alone is None else f"{alone:.4f}",
                     f"{r[f'cpu_s_{mode}']:.3f}", f"{r[f'minflt_{mode}']:.0f}"])
    dcp = r.get("blocking_s_dcp_async") or 0.0
    lazy_vs = f"; blocking_s_lazy = {r['blocking_s_lazy'] / dcp:.3f}x blocking_s_dcp_async" if dcp else ""
    return "\n".join([
        f"autosaved bench train: GPT-2-shaped, {r['params'] / 1e6:.1f}M parameters, state "
        f"{human_bytes(r['state_bytes'])}, median of {r['steps']} steady-state steps per mode (two runs per "
        f"mode in mirrored order, each after {r['warmup']} warm-up steps), on {r['host']}",
        table(rows, ["mode", "step_s", "vs none", "blocking_s", "alone_s", "cpu_s", "faults"]),
        "alone_s: the same state handed over once more with nothing else running (lazy: update + fence); "
        "cpu_s, faults: the trainer's CPU seconds and minor page faults per step (every thread)",
        f"daemon CPU per step: eager {r['daemon_cpu_s_eager']:.3f} s, lazy {r['daemon_cpu_s_lazy']:.3f} s; lazy's copy "
        f"ran {'in the background' if r.get('copy_at_lazy') == 'overlap' else 'at the fence'} "
        f"({r.get('background_copies_lazy', 0)} copies by the background copier) "
        f"({r['threads']} torch threads on {r['host']})",
        f"targets: lazy <= 1.15x none and <= eager (lazy {r['step_s_lazy'] / base:.3f}x, eager "
        f"{r['step_s_eager'] / base:.3f}x); lazy blocking <= 0.1x DCP's{lazy_vs}",
    ])


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise AutosavedError("bench train needs PyTorch (pip install 'autosaved[torch]')") from None
    cfg = TINY if args.small else GPT2_SMALL
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-") as tmp:
        result = measure(cfg, max(1, args.steps), max(2, args.seq), max(1, args.batch), Path(tmp),
                         max(0, args.warmup))
    if args.json:
        print_json(result)
    else:
        print(render(result))
    return 0
