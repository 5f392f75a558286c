"""One rank of a multi-rank DCP run for tests/test_dcp.py (and nothing else): a real process that joins a
gloo process group over 127.0.0.1 and saves/loads through the real autosaved daemons.

    python tests/dcp_worker.py STEPS_JSON OUT_DIR       (RANK, WORLD_SIZE, MASTER_PORT, AUTOSAVED_ADDRESS set)

or, for world size 1, ``run(...)`` in the test's own process (which has torch imported already).

The state is a model + Adam optimizer trained ``step`` steps from a fixed seed with one thread, so every
process can recompute the exact expected tensors. Tensors whose first dimension divides by the world size
are sharded over the ranks as DTensors (what FSDP/TP state dicts are); the rest are replicated.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor, Shard, init_device_mesh

from autosaved.integrations.dcp import (
    AutosavedStorageReader,
    AutosavedStorageWriter,
    ObjectStoreSource,
    global_version,
)


def reference(step: int, seed: int = 0) -> dict[str, Any]:
    """The full (unsharded) model + optimizer state after ``step`` Adam steps from ``seed`` (one thread:
    the same bits in every process)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference(step, seed)
    finally:
        torch.set_num_threads(threads)


def _reference(step: int, seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(max(step, 1)):
        opt.zero_grad()
        model(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()
        opt.step()
    if step == 0:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def shard(tree: Any, rank: int, world: int, mesh: Any) -> Any:
    if isinstance(tree, dict):
        return {k: shard(v, rank, world, mesh) for k, v in tree.items()}
    if isinstance(tree, list):
        return [shard(v, rank, world, mesh) for v in tree]
    if isinstance(tree, torch.Tensor) and mesh is not None and tree.dim() >= 1 and tree.size(0) % world == 0:
        return DTensor.from_local(tree.chunk(world)[rank].clone(), mesh, [Shard(0)], run_check=False)
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    return tree


def full(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: full(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [full(v) for v in tree]
    if isinstance(tree, DTensor):
        return tree.full_tensor()
    return tree


def differences(got: Any, want: Any, path: str = "") -> list[str]:
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            return [f"{path}: keys differ"]
        return [d for k in want for d in differences(got[k], want[k], f"{path}.{k}")]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: lists differ"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in differences(g, w, f"{path}[{i}]")]
    if isinstance(want, torch.Tensor):
        same = (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
                and torch.equal(got, want))
        return [] if same else [f"{path}: tensors differ"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


class TestWriter(AutosavedStorageWriter):
    """The real writer; a rank may pause before sending its part, hold after its daemon acknowledged it
    (``hold``: touch a file, wait for another), or SIGKILL itself right after."""

    def __init__(self, job: str, *, out: Path, pause: dict[str, Any] | None, kill_rank: int | None,
                 wait: str = "committed", hold: dict[str, Any] | None = None) -> None:
        super().__init__(job, wait=wait, timeout=20.0, save_timeout=60.0)
        self.out, self.pause, self.kill_rank, self.hold = out, pause, kill_rank, hold

    def write_data(self, plan: Any, planner: Any) -> Any:
        if self.pause and self.rank == self.pause["rank"]:
            (self.out / self.pause["file"]).touch()
            wait_file(self.out / self.pause["go"])
        fut = super().write_data(plan, planner)
        if self.hold and self.rank == self.hold["rank"]:
            (self.out / self.hold["file"]).touch()
            wait_file(self.out / self.hold["go"])
        if self.rank == self.kill_rank:
            (self.out / f"killed-{self.rank}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return fut


def wait_file(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


def run(steps: list[dict[str, Any]], out: Path, rank: int, world: int, job: str) -> list[dict[str, Any]]:
    """Run ``steps`` as rank ``rank`` of ``world``; results also go to ``out/rank-R.json`` after each step."""
    mesh = None
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        mesh = init_device_mesh("cpu", (world,))
    results: list[dict[str, Any]] = []
    for step in steps:
        op = step["op"]
        res: dict[str, Any] = {"op": op}
        try:
            if op == "save":
                state = shard(reference(step["step"]), rank, world, mesh)
                writer = TestWriter(job, out=out, pause=step.get("pause"), kill_rank=step.get("kill_rank"),
                                    wait=step.get("wait", "committed"), hold=step.get("hold"))
                md = dcp.save(state, storage_writer=writer)
                res.update(ok=True, version=global_version(md), coordinator_version=writer.last_version)
            elif op == "load":
                state = shard(reference(1, seed=99), rank, world, mesh)  # a fresh model: other values
                remote = ObjectStoreSource(step["remote"]) if step.get("remote") else None
                reader = AutosavedStorageReader(job, version=step.get("version"), timeout=20.0,
                                                record_address=step.get("record_address"), remote=remote)
                dcp.load(state, storage_reader=reader)
                diffs = differences(full(state), reference(step["step"]))
                res.update(ok=not diffs, diffs=diffs[:5], version=reader.record.version if reader.record else None,
                           sources={str(k): v for k, v in reader.sources.items()})
            elif op == "mark":
                (out / f"{step['name']}-{rank}").touch()
                res["ok"] = True
            elif op == "wait_file":
                wait_file(out / step["name"])
                res["ok"] = True
        except BaseException as exc:  # DCP's CheckpointException is a BaseException
            res.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000], trace=traceback.format_exc()[-3000:])
        results.append(res)
        (out / f"rank-{rank}.json").write_text(json.dumps(results, indent=1))
    if world > 1 and all(r["ok"] or r["op"] == "save" for r in results):
        dist.destroy_process_group()
    return results


def main() -> int:
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1)  # a stuck rank's stacks, on demand
    run(json.loads(sys.argv[1]), Path(sys.argv[2]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
        os.environ["DCP_JOB"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
