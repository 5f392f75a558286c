"""A format-2 save after 100 LangGraph puts, at a history of N checkpoints, in process (issue 20).

    python scripts/save_scaling.py 1000 100000 [--profile]

The storage half of ``autosaved bench history`` without the daemon, its socket and its log, so the save's
own cost shows: the deltas are the ones ``AutosavedSaver.put`` sends (the bench's thread shape), merged as
the daemon merges them (``merge_counted`` with a generation per snapshot, the changed paths recorded with
``state.touch`` and handed to the save), saved every 5,000 puts while filling, then three rounds of 100
puts and a save, then the measured round: the bytes and time of its save and of the retention (keep 2)
after it. Run it from the tree to measure; a build without ``state.touch`` is measured without the paths
(the build before them), so the same script compares two builds.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import autosaved.state as st
from autosaved.bench.history import checkpoint
from autosaved.codec import pack
from autosaved.integrations.langgraph import AutosavedSaver
from autosaved.storage.local import JobStore


class History:
    def __init__(self, root: Path) -> None:
        from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

        self.saver: Any = AutosavedSaver.__new__(AutosavedSaver)  # only its request plans: no client
        self.saver.serde, self.saver._latest = JsonPlusSerializer(), {}
        self.parent: str | None = None
        self.steps = 0
        self.store = JobStore(root, os.geteuid(), "history")
        self.store.write_format = 2
        self.tree = st.empty_node()
        self.gen, self.version = 1, 0
        self.paths = hasattr(st, "touch")
        self.touched: Any = st.Touched() if self.paths else None  # type: ignore[attr-defined]
        self.base: int | None = None

    def put(self) -> None:
        cp, meta, new = checkpoint(self.steps)
        config = {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                                   **({"checkpoint_id": self.parent} if self.parent else {})}}
        plan = self.saver._plan_put(config, cp, meta, new)
        op = next(plan)
        if op[0] == "restore":
            op = plan.send([None])
        delta = pack(op[1])
        if self.paths:
            st.touch(self.touched, self.tree, delta)  # type: ignore[attr-defined]
        self.tree = st.merge_counted(self.tree, delta, self.gen).root
        self.parent = cp["id"]
        self.steps += 1

    def save(self, profile: bool = False) -> tuple[int, float, float]:
        self.version += 1
        self.gen += 1
        extra: dict[str, Any] = {}
        if self.paths:
            extra["changed"] = (self.base, self.touched) if self.base is not None else None
            self.touched, self.base = st.Touched(), self.version  # type: ignore[attr-defined]
        prof = cProfile.Profile() if profile else None
        if prof is not None:
            prof.enable()
        t0 = time.perf_counter()
        result = self.store.write_version(self.tree, version=self.version, step=self.version, reason="bench",
                                          meta={}, sessions={}, chunk_size=4 << 20, **extra)
        t1 = time.perf_counter()
        self.store.apply_retention(2, protect={self.version})
        t2 = time.perf_counter()
        if prof is not None:
            prof.disable()
            pstats.Stats(prof).sort_stats("cumulative").print_stats(20)
        return result.bytes_written, t1 - t0, t2 - t1


def run(n: int, profile: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="autosaved-save-scaling-"))
    try:
        h = History(tmp)
        while h.steps < n - 400:
            h.put()
            if h.steps % 5000 == 0:
                h.save()
        h.save()
        for _ in range(3):
            for _ in range(100):
                h.put()
            h.save()
        for _ in range(100):
            h.put()
        written, write_s, retention_s = h.save(profile)
        print(f"checkpoints={h.steps} changed_paths={h.paths} save_after_100: bytes={written} "
              f"write_ms={write_s * 1e3:.1f} retention_ms={retention_s * 1e3:.1f} load={os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(tmp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sizes", type=int, nargs="+", help="history sizes (checkpoints) at the measured save, at least 500")
    p.add_argument("--profile", action="store_true", help="print a profile of the measured save")
    args = p.parse_args()
    for n in args.sizes:
        run(max(500, n), args.profile)


if __name__ == "__main__":
    main()
