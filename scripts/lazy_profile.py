"""Per-thread profile of ``bench train``'s modes in one process (issue 21): one GPT-2-shaped model, the
modes rotated in blocks, each step's wall time, per-thread CPU and run-queue wait and context switches
(``/proc/self/task/*/{schedstat,status}``), and the CPU other processes used meanwhile (``/proc/stat``
less ours): only steps where others used under ``--quiet`` cores are kept, since on a shared host the
load swings the step time several-fold.

Per mode also each thread's minor page faults (``/proc/self/task/*/stat``) and the lazy updates whose copy
went to the background copier during the kept steps (``bg``): with the copy at the fence any is a fence
that came after ``lazyplan.fence_wait`` ran out, and that step paid for a copy beside its compute (issue 21:
before the wait became 8x the last step, a block's first lazy step did so here, since the fence at the
end of the block before taught a gap of ~0 and a 1 s wait).

Modes: ``none``, ``eager``, ``lazy`` (the copy where ``client/lazyplan.py`` puts it), ``lazy_old``
(``overlap=True``: always in the background at nice 19), ``lazy_idle`` (the background copier as
SCHED_IDLE), ``lazy_nice0``.

    python scripts/lazy_profile.py --steps 2 --rounds 4 --modes none,eager,lazy,lazy_old
    python scripts/lazy_profile.py --layers 6 --width 512 ...   # a 540 MB state, quicker
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from autosaved.bench.train import _DAEMON_CONFIG, GPT2_SMALL, GPTConfig, _state, build_model
from autosaved.client.lazy import LazyClient
from autosaved.client.sync import Client
from autosaved.testing.private import PrivateDaemon


def tasks() -> dict[int, tuple[int, int, int, int, int]]:
    """tid -> (run ns, wait ns, vol cs, invol cs, minor faults)"""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                run, wait, _ = (int(x) for x in f.read().split())
            vol = inv = 0
            with open(f"/proc/self/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        inv = int(line.split()[1])
            with open(f"/proc/self/task/{tid}/stat") as f:
                minflt = int(f.read().rsplit(")", 1)[1].split()[7])
            out[int(tid)] = (run, wait, vol, inv, minflt)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return out


def sysbusy() -> tuple[float, float]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    busy = (sum(v[:8]) - v[3] - v[4]) / hz
    return busy, v[7] / hz


def owncpu(dpid: int) -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open(f"/proc/{dpid}/stat") as f:
        fl = f.read().rsplit(")", 1)[1].split()
    return r.ru_utime + r.ru_stime + (int(fl[11]) + int(fl[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", default="none,eager,lazy")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--quiet", type=float, default=0.15)
    a = p.parse_args()
    cfg = GPT2_SMALL
    if (a.layers, a.width) != (12, 768):
        cfg = GPTConfig(layers=a.layers, width=a.width, heads=12 if a.width % 12 == 0 else 8)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    modes = a.modes.split(",")
    res: dict[str, list] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as tmp, PrivateDaemon(Path(tmp) / "d", config=_DAEMON_CONFIG) as d:
        eager = Client("e", address=d.address, timeout=600)
        eager.connect()
        lazy = LazyClient(Client("l", address=d.address, timeout=600))
        lazy.client.connect()
        names = {os.getpid(): "main"}
        names[lazy._copier.submit(threading.get_native_id).result()] = "copier"
        names[lazy._worker.submit(threading.get_native_id).result()] = "sender"

        real_submit = lazy._copier.submit

        def set_copier(mode: str) -> None:
            def apply() -> None:
                tid = threading.get_native_id()
                os.sched_setscheduler(tid, os.SCHED_IDLE if mode == "lazy_idle" else os.SCHED_OTHER, os.sched_param(0))
                os.setpriority(os.PRIO_PROCESS, tid, 0 if mode == "lazy_nice0" else 19)
            real_submit(apply).result()
            lazy.overlap = True if mode == "lazy_old" else None

        def fence() -> None:
            lazy.fence()

        def step(i: int, mode: str) -> None:
            tokens = torch.randint(0, cfg.vocab, (a.batch, a.seq + 1), generator=gen)
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), tokens[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if mode.startswith("lazy"):
                fence()
            opt.step()
            if mode == "eager":
                eager.update(_state(model, opt, i), step=i)
            elif mode.startswith("lazy"):
                lazy.update(_state(model, opt, i), step=i)

        i = 0
        for r in range(a.rounds):
            for mode in modes:
                if mode.startswith("lazy"):
                    set_copier(mode)
                warm = 3 if r == 0 else 1
                for k in range(warm + a.steps):
                    t0 = time.perf_counter()
                    sb, own = sysbusy(), owncpu(d.proc.pid)
                    before = tasks()
                    bg = lazy.background_copies
                    step(i, mode)
                    wall = time.perf_counter() - t0
                    after = tasks()
                    sa, own2 = sysbusy(), owncpu(d.proc.pid)
                    others = (sa[0] - sb[0]) - (own2 - own)
                    i += 1
                    if k < warm:
                        continue
                    per = {}
                    for tid, v in after.items():
                        b = before.get(tid, (0, 0, 0, 0, 0))
                        dv = tuple(x - y for x, y in zip(v, b, strict=False))
                        if dv[0] > 1e6 or dv[2] or dv[3]:
                            per[names.get(tid, str(tid))] = dv
                    res[mode].append((wall, per, others / wall, (sa[1] - sb[1]) / wall, lazy.background_copies - bg))
                fence()
                lazy.wait()
        lazy.close()
        eager.close()
    print("others per step (cores):", {m: [round(x[2], 2) for x in res[m]] for m in modes})
    for m in modes:
        res[m] = [x for x in res[m] if x[2] < a.quiet] or res[m][:1]
    base = statistics.median(x[0] for x in res[modes[0]])
    for mode in modes:
        walls = [x[0] for x in res[mode]]
        med = statistics.median(walls)
        bgs = sum(x[4] for x in res[mode])
        print(f"== {mode}: step median {med:.3f} s ({med / base:.2f}x) quiet walls {[round(w, 3) for w in walls]}"
              f" bg {bgs}")
        agg: dict[str, list] = {}
        for _, per, _o, _s, _bg in res[mode]:
            for n, v in per.items():
                agg.setdefault(n, []).append(v)
        n_steps = len(res[mode])
        tot = 0.0
        for n, vs in sorted(agg.items(), key=lambda kv: -sum(v[0] for v in kv[1])):
            run = sum(v[0] for v in vs) / n_steps / 1e9
            tot += run
            wait = sum(v[1] for v in vs) / n_steps / 1e9
            vol = sum(v[2] for v in vs) / n_steps
            inv = sum(v[3] for v in vs) / n_steps
            flt = sum(v[4] for v in vs) / n_steps
            if run > 0.005 or vol > 5:
                print(f"   {n:>8}: cpu {run:.3f} s  runq-wait {wait:.3f} s  vol {vol:.0f}  invol {inv:.0f}"
                      f"  minflt {flt:.0f}")
        print(f"   total cpu {tot:.3f}")


if __name__ == "__main__":
    main()
