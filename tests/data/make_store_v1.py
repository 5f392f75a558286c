#!/usr/bin/env python3
"""Write tests/data/store_v1: a small store made by the daemon of this release, that every later build
must restore exactly (tests/test_format_store.py). Run it again only to add a *new* fixture for a new
format; never regenerate store_v1 itself.

    python tests/data/make_store_v1.py tests/data/store_v1

Jobs (owner folder ``jobs/0``; the test moves it to the caller's uid):
- ``model``: compressible (zeros: stored .zst) and incompressible (raw) chunks over several versions,
  a bfloat16 torch tensor, int keys (an optimizer state), tuples, bytes, big ints, NaN; then log records
  past its last version (the daemon is SIGKILLed, so they stay in the log).
- ``agent``: strings, lists, nested stages; committed only.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

CONFIG = ('chunk_size = "64KiB"\n[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'
          'keep_last = 3\ncompression = "auto"\n')


def noise(n: int, salt: int) -> np.ndarray[Any, Any]:
    """Incompressible-looking bytes with no RNG (a stream that never changes across numpy versions)."""
    i = np.arange(n, dtype=np.uint64) + np.uint64(salt)
    return ((i * np.uint64(2654435761) + (i >> np.uint64(7)) * np.uint64(40503)) % np.uint64(251)).astype(np.uint8)


def model_updates() -> list[tuple[dict[Any, Any], str]]:
    """(delta, wait) in order; a ``save`` entry is ({}, "save")."""
    import torch

    bf16 = torch.arange(0, 64, dtype=torch.float32).div(7).to(torch.bfloat16).reshape(8, 8)
    return [
        ({"step": 1, "weights": noise(150_000, 1), "zeros": np.zeros(200_000, np.float32),
          "optim": {"state": {0: {"exp_avg": np.arange(10, dtype=np.float64)}, 1: {"step": 3}},
                    "param_groups": [{"lr": 0.1, "params": (0, 1)}]},
          "bf16": bf16, "shape": (3, "x", b"\x00\xff"), "big": 2**70, "nan": float("nan")}, "logged"),
        ({}, "save"),
        ({"step": 2, "weights": noise(150_000, 2)}, "logged"),
        ({}, "save"),
        ({"step": 3, "optim": {"state": {0: {"exp_avg": np.arange(10, 20, dtype=np.float64)}}}}, "committed"),
        # Past the last version: only in the write-ahead log.
        ({"step": 4, "note": "after the last version"}, "logged"),
        ({"step": 5, "weights": noise(150_000, 5)}, "logged"),
    ]


def agent_updates() -> list[tuple[dict[Any, Any], str]]:
    return [
        ({"current_stage": "plan", "completed_steps": [], "output_cache": {"q": "what?"}}, "logged"),
        ({"current_stage": "reasoning", "completed_steps": ["plan"], "output_cache": {"a": ["x", 1, None]}},
         "committed"),
    ]


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/store_v1")
    if out.exists():
        raise SystemExit(f"{out} exists: a fixture is never regenerated, only added")
    from autosaved.client.sync import Client
    from autosaved.testing.private import PrivateDaemon

    d = PrivateDaemon(config=CONFIG)
    try:
        d.start()
        for job, updates in (("model", model_updates()), ("agent", agent_updates())):
            c = Client(job, address=d.address, timeout=30, save_timeout=120)
            for delta, wait in updates:
                if wait == "save":
                    c.save()
                else:
                    c.update(delta, wait=wait)
            c.close()
        d.send_signal(signal.SIGKILL)  # keep the log records past the last version
        assert d.proc is not None
        d.proc.wait()
        src = d.state_dir / "jobs" / str(os.geteuid())
        shutil.copytree(src, out / "jobs" / "0", ignore=shutil.ignore_patterns("tmp"))
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
