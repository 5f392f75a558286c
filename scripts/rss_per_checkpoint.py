"""Where a daemon's memory goes per LangGraph checkpoint (issue 20: RSS growth <= 2x the history's payload).

    python scripts/rss_per_checkpoint.py --checkpoints 2000,20000
    python scripts/rss_per_checkpoint.py --checkpoints 2000,20000 --builds /work/main,.   # side by side
    python scripts/rss_per_checkpoint.py --checkpoints 2000,20000 --tracemalloc 25        # file:line table

Fills one thread of ``autosaved bench history``'s shape (:func:`autosaved.bench.history.checkpoint`) at
``accepted`` into a private daemon (format 2), saves at each size, puts 100 more and reads 50 (as the
bench does before it reads the RSS), and asks the daemon itself (a probe
thread that ``sitecustomize`` starts only in that daemon) for its RSS, glibc's heap figures (``mallinfo2``),
the count of each type among the objects the garbage collector tracks and, with ``--tracemalloc N``
(slower, more memory), the N file:line sites holding the most memory. Prints the RSS growth per checkpoint
and its ratio to the payload (the serialized values each checkpoint adds, as the bench counts them).
``--builds`` runs the daemon of each source tree (its ``PYTHONPATH``) one after the other in one run, so
their figures compare under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The probe, run inside the daemon: a thread that answers request files with a JSON report.
_PROBE = r'''
import os, threading
if os.environ.get("RSS_PROBE_DIR"):
    def _probe() -> None:
        import collections, ctypes, gc, json, time, tracemalloc
        d = os.environ["RSS_PROBE_DIR"]
        class M(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = M
        def rss() -> int:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
            return 0
        n = 0
        prev = None
        while True:
            req = os.path.join(d, f"req-{n}")
            if not os.path.exists(req):
                time.sleep(0.1)
                continue
            ask = json.loads(open(req).read())
            out = {"rss": rss()}
            m = libc.mallinfo2()
            out["malloc"] = {"arena": m.arena, "in_use": m.uordblks, "free": m.fordblks, "mmapped": m.hblkhd}
            # pymalloc's own figures (sys._debugmallocstats writes them to fd 2, borrowed for the call).
            import sys, tempfile
            with tempfile.TemporaryFile() as tmp:
                saved = os.dup(2)
                os.dup2(tmp.fileno(), 2)
                try:
                    sys._debugmallocstats()
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
                tmp.seek(0)
                text = tmp.read().decode()
            pym = {}
            for line in text.splitlines():
                if line.startswith("#") and "=" in line:
                    k, v = line[1:].split("=", 1)
                    pym[k.strip()] = int(v.strip().replace(",", ""))
            out["pymalloc"] = {k: pym.get(k, 0) for k in ("bytes in allocated blocks", "bytes in available blocks",
                                                           "bytes in unused pools", "arenas allocated current")}
            objs = gc.get_objects()
            out["tracked"] = len(objs)
            out["types"] = collections.Counter(type(o).__name__ for o in objs).most_common(25)
            del objs
            if tracemalloc.is_tracing():
                out["traced_peak"] = tracemalloc.get_traced_memory()[1]
                tracemalloc.reset_peak()
                snap = tracemalloc.take_snapshot()
                stats = snap.statistics("lineno")
                out["traced"] = sum(s.size for s in stats)
                out["sites"] = [[str(s.traceback), s.size, s.count] for s in stats[: ask.get("top", 25)]]
                if prev is not None:  # what was freed since the last report, by site: where holes come from
                    group = "traceback" if tracemalloc.get_traceback_limit() > 1 else "lineno"
                    freed = sorted(snap.compare_to(prev, group), key=lambda d: d.size_diff)
                    out["freed"] = [[" <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in d.traceback),
                                     d.size_diff, d.count_diff] for d in freed[:12] if d.size_diff < 0]
                prev = snap
                del snap, stats
            if ask.get("collect"):
                out["collected"] = gc.collect()
                out["rss_after_collect"] = rss()
                libc.malloc_trim(0)
                out["rss_after_trim"] = rss()
            with open(os.path.join(d, f"rep-{n}.tmp"), "w") as f:
                json.dump(out, f)
            os.rename(os.path.join(d, f"rep-{n}.tmp"), os.path.join(d, f"rep-{n}"))
            n += 1
    threading.Thread(target=_probe, daemon=True, name="rss-probe").start()
'''

CONFIG = ('storage_format = 2\nmemory_limit = "8GiB"\n[policy]\ninterval = "off"\nidle = "off"\n'
          'dirty_bytes = "off"\nmin_gap = "0s"\nkeep_last = 2\n')


class Probe:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.n = 0

    def ask(self, **req: Any) -> dict[str, Any]:
        (self.folder / f"req-{self.n}").write_text(json.dumps(req))
        rep = self.folder / f"rep-{self.n}"
        while not rep.exists():
            time.sleep(0.05)
        self.n += 1
        out: dict[str, Any] = json.loads(rep.read_text())
        return out


def run_build(build: Path, sizes: list[int], top: int, per_step: float, collect: bool,
              save_every: int, before_save: bool = False) -> list[dict[str, Any]]:
    from autosaved.bench.history import Thread
    from autosaved.client.sync import Client
    from autosaved.integrations.langgraph import AutosavedSaver
    from autosaved.testing.private import PrivateDaemon

    root = Path(tempfile.mkdtemp(prefix="autosaved-rss-"))
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_PROBE)
    probe_dir = root / "probe"
    probe_dir.mkdir()
    # PYTHONSAFEPATH: no current directory first on sys.path, so the build named is the one that runs.
    env = {"PYTHONPATH": f"{site}:{build.resolve()}", "RSS_PROBE_DIR": str(probe_dir), "PYTHONSAFEPATH": "1"}
    if top:
        env["PYTHONTRACEMALLOC"] = os.environ.get("RSS_TRACE_FRAMES", "1")  # more frames: tracebacks of what was freed
    out = []
    with PrivateDaemon(root / "d", config=CONFIG, env=env) as daemon, \
            AutosavedSaver("history", address=daemon.address, wait="accepted") as saver, \
            Client("history", address=daemon.address, timeout=120, save_timeout=600) as admin:
        probe = Probe(probe_dir)
        thread = Thread("autosaved", saver.put, saver.get_tuple)
        thread.put(10)
        admin.save()
        base = probe.ask(top=top)
        for size in sizes:
            size -= 100  # the 100 puts after the save make it ``size``
            while thread.steps < size:
                thread.put(min(size - thread.steps, save_every or size))
                if before_save:
                    pre = probe.ask(top=top)
                    print(f"   before the save at {thread.steps}: RSS {pre['rss'] / 2**20:.1f} MB, pymalloc "
                          f"{pre['pymalloc']}, glibc {pre['malloc']}" + (f", traced {pre['traced'] / 2**20:.1f} MB"
                                                                         if top else ""), flush=True)
                    for site, nbytes, count in pre.get("sites", []):
                        print(f"   {nbytes / 2**20:8.2f} MB {count:>9} {site}")
                admin.save()
            # As ``bench history`` does before it reads the RSS: 100 more puts (the job dirty again: its big
            # mappings copied once, beside the saved tree's) and 50 reads.
            thread.put(100)
            thread.get(50)
            # A save's reply comes at its commit; what follows it (retention, a heap trim) is done by now.
            time.sleep(1)
            rep = probe.ask(top=top, collect=collect)
            # The state cache's estimate of the tree's memory (README: binary leaves + 6x the rest's encoding).
            rep["cache_estimate"] = admin.status().get("cache_bytes", 0)
            grown = rep["rss"] - base["rss"]
            payload = per_step * (thread.steps - 10)
            rep.update(checkpoints=thread.steps, rss_growth=grown, per_checkpoint=grown / (thread.steps - 10),
                       ratio=grown / payload)
            if top:
                rep["traced_per_checkpoint"] = (rep["traced"] - base["traced"]) / (thread.steps - 10)
            out.append(rep)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoints", default="2000,20000", help="sizes to fill to, comma separated")
    p.add_argument("--builds", default=".", help="source trees whose daemon to run, comma separated")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="N", help="report the N top file:line sites")
    p.add_argument("--collect", action="store_true", help="also run gc.collect() in the daemon and report RSS after")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="save after every N puts (default: only at each size, as the bench does)")
    p.add_argument("--before-save", action="store_true", help="also probe before each save")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    from autosaved.bench.history import payload

    sizes = [int(s) for s in args.checkpoints.split(",")]
    per_step = statistics.mean(payload(i) for i in range(20, 40))
    result: dict[str, Any] = {"payload_per_checkpoint": per_step, "load": os.getloadavg()[0], "builds": {}}
    for build in args.builds.split(","):
        result["builds"][build] = run_build(Path(build), sizes, args.tracemalloc, per_step, args.collect,
                                             args.save_every, args.before_save)
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        json.dump(result, sys.stdout)
        return
    print(f"payload {per_step:.0f} B per checkpoint; load {result['load']:.1f} -> {result['load_after']:.1f}")
    for build, reps in result["builds"].items():
        for r in reps:
            m = r["malloc"]
            print(f"{build}: {r['checkpoints']} checkpoints: RSS {r['rss'] / 2**20:.1f} MB, growth "
                  f"{r['per_checkpoint']:.0f} B/checkpoint = {r['ratio']:.2f}x payload; glibc in use "
                  f"{m['in_use'] / 2**20:.1f} MB free {m['free'] / 2**20:.1f} MB mmapped {m['mmapped'] / 2**20:.1f} MB;"
                  f" gc-tracked {r['tracked']}; the cache's estimate {r['cache_estimate'] / r['checkpoints']:.0f} "
                  "B/checkpoint"
                  + (f"; after gc.collect() ({r['collected']} freed) RSS {r['rss_after_collect'] / 2**20:.1f} MB"
                     + f", after malloc_trim {r['rss_after_trim'] / 2**20:.1f} MB" if "collected" in r else ""))
            print("   pymalloc:", r["pymalloc"])
            print("   types:", ", ".join(f"{t}={n}" for t, n in r["types"][:14]))
            for site, nbytes, count in r.get("freed", []):
                print(f"   freed since the probe before: {nbytes / 2**20:8.2f} MB {count:>9} {site}")
            if "sites" in r:
                print(f"   traced {r['traced'] / 2**20:.1f} MB, {r['traced_per_checkpoint']:.0f} B/checkpoint, "
                      f"peak since the last report {r['traced_peak'] / 2**20:.1f} MB")
                for site, size, count in r["sites"]:
                    print(f"   {size / 2**20:8.2f} MB {count:>9} {site}")


if __name__ == "__main__":
    main()
