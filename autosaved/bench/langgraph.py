"""``autosaved bench langgraph [--puts 500] [--rounds 2] [--json]``: LangGraph checkpointers side by side.

The same sequence of checkpoints (one agent thread: a message window that changes every step, a step
counter, and a context channel written once) goes through each saver in turn, round after round (the
savers alternate, so a busy host's drift hits all of them alike), through ``aput`` (the async savers) and
``put`` (the sync ones). Like with like, by durability:

- ``autosaved_logged`` (``wait="logged"``: fdatasynced in the daemon's log, survives SIGKILL of this process
  and of the daemon, and power loss) beside ``sqlite_full`` (LangGraph's SQLite saver with ``PRAGMA
  synchronous=FULL``: the WAL is fsynced at every commit);
- ``autosaved_accepted`` (in daemon memory: survives this process's death, not the daemon's) beside
  ``sqlite_normal`` (``synchronous=NORMAL``: in the OS's page cache at each commit, survives a process
  crash, not power loss) and ``sqlite_default`` (the saver as LangGraph sets it up: WAL journal, the
  library's default ``synchronous``, which the report names: FULL with the sqlite3 of CPython's builds);
- ``memory`` (``InMemorySaver``, no persistence: the floor).

Reported per saver and API: p50/p99 latency of one call (median of the rounds' p50s) and calls per second,
and then the p50 of ``get_tuple``/``aget_tuple`` of the thread's newest checkpoint (what a graph reads when
it resumes a thread), ``--gets`` times; for our savers also the CPU per put in this process and in the
daemon (the profile's first cut, which a busy host's scheduling waits do not blur).
Targets (issue 21): logged p50 <= sqlite_full's, accepted p50 <= sqlite_default's.
Needs ``pip install 'autosaved[langgraph]' langgraph-checkpoint-sqlite``.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..testing.private import PrivateDaemon

POLICY = '[policy]\ninterval = "60s"\nidle = "5s"\nmin_gap = "5s"\n'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--puts", type=int, default=500, help="checkpoints per saver (default 500)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, the savers alternating (default 2)")
    p.add_argument("--gets", type=int, default=100, help="get_tuple calls per saver after its puts (default 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _checkpoints(n: int) -> list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """(checkpoint, metadata, new_versions) for n steps of one thread, parent chain implied by order."""
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.base.id import uuid6

    out = []
    context = {"system": "You are a careful research agent. " * 60}
    for i in range(n):
        cp: dict[str, Any] = dict(empty_checkpoint())
        cp["id"] = str(uuid6(clock_seq=-1))
        window = [{"role": "user" if j % 2 else "assistant", "content": f"turn {j}: " + "lorem ipsum " * 15}
                  for j in range(max(0, i - 8), i + 1)]
        cp["channel_values"] = {"messages": window, "step": i, "context": context}
        versions = {"messages": f"{i + 1:032}.0", "step": f"{i + 1:032}.0", "context": f"{1:032}.0"}
        cp["channel_versions"] = versions
        new = {k: v for k, v in versions.items() if i == 0 or k != "context"}
        out.append((cp, {"source": "loop", "step": i, "parents": {}}, new))
    return out


def _configs(thread: str, n: int, ids: list[str]) -> list[dict[str, Any]]:
    return [{"configurable": {"thread_id": thread, "checkpoint_ns": "", **({"checkpoint_id": ids[i - 1]} if i else {})}}
            for i in range(n)]


def _get_stats(latencies: list[float]) -> dict[str, float]:
    return {"get_p50_ms": 1e3 * statistics.median(latencies)} if latencies else {}


async def _aget(saver: Any, thread: str, gets: int) -> dict[str, float]:
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    latencies = []
    for _ in range(gets):
        t = time.perf_counter()
        got = await saver.aget_tuple(config)
        latencies.append(time.perf_counter() - t)
        assert got is not None
    return _get_stats(latencies)


def _get(saver: Any, thread: str, gets: int) -> dict[str, float]:
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    latencies = []
    for _ in range(gets):
        t = time.perf_counter()
        got = saver.get_tuple(config)
        latencies.append(time.perf_counter() - t)
        assert got is not None
    return _get_stats(latencies)


def _stats(latencies: list[float], total: float) -> dict[str, float]:
    latencies = sorted(latencies)
    return {"p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "puts_per_s": len(latencies) / total}


async def _adrive(saver: Any, thread: str, cps: list[Any], warmup: int = 5) -> dict[str, float]:
    configs = _configs(thread, len(cps), [cp["id"] for cp, _, _ in cps])
    latencies = []
    start = 0.0
    for i, (cp, meta, new) in enumerate(cps):
        if i == warmup:
            start = time.perf_counter()
        t = time.perf_counter()
        await saver.aput(configs[i], cp, meta, new)
        if i >= warmup:
            latencies.append(time.perf_counter() - t)
    return _stats(latencies, time.perf_counter() - start)


def _drive(saver: Any, thread: str, cps: list[Any], warmup: int = 5) -> dict[str, float]:
    configs = _configs(thread, len(cps), [cp["id"] for cp, _, _ in cps])
    latencies = []
    start = 0.0
    for i, (cp, meta, new) in enumerate(cps):
        if i == warmup:
            start = time.perf_counter()
        t = time.perf_counter()
        saver.put(configs[i], cp, meta, new)
        if i >= warmup:
            latencies.append(time.perf_counter() - t)
    return _stats(latencies, time.perf_counter() - start)


SAVERS = ("autosaved_logged", "sqlite_full", "autosaved_accepted", "sqlite_normal", "sqlite_default", "memory")
PEERS = {"autosaved_logged": "sqlite_full", "autosaved_accepted": "sqlite_default"}


def _cpu(daemon: PrivateDaemon) -> tuple[float, float]:
    """CPU seconds so far of this process (the client, its ZeroMQ I/O thread included) and of the daemon, in
    nanoseconds' resolution where Linux gives them (the scheduler's run time of each thread): the clock-tick
    counts psutil reads moved in steps of 17-33 us per put over a run of a few hundred puts. (A daemon thread
    that ends inside the window drops out of the sum, as in scripts/cost_per_request.py.)"""
    assert daemon.proc is not None
    mine = time.process_time()
    threads = glob.glob(f"/proc/{daemon.proc.pid}/task/*/schedstat")
    if not threads:
        import psutil

        times = psutil.Process(daemon.proc.pid).cpu_times()
        return mine, times.user + times.system
    theirs = 0
    for path in threads:
        try:
            with open(path) as f:
                theirs += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return mine, theirs / 1e9


async def _round(r: int, puts: int, root: Path, daemon: PrivateDaemon, api: str, cps: list[Any],
                 gets: int) -> dict[str, Any]:
    """One saver after the other, each on a thread of its own."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite import SqliteSaver
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from ..integrations.langgraph import AutosavedSaver

    out: dict[str, Any] = {}
    for name in SAVERS:
        thread = f"{name}-{api}-{r}"
        if name.startswith("autosaved_"):
            wait = name.removeprefix("autosaved_")
            with AutosavedSaver("bench-langgraph", address=daemon.address, wait=wait) as saver:
                before = _cpu(daemon)
                out[name] = await _adrive(saver, thread, cps) if api == "aput" else _drive(saver, thread, cps)
                after = _cpu(daemon)
                # Where a put's time goes, robust to a busy host (whose scheduling waits only wall time shows).
                out[name]["client_cpu_us"] = 1e6 * (after[0] - before[0]) / len(cps)
                out[name]["daemon_cpu_us"] = 1e6 * (after[1] - before[1]) / len(cps)
                out[name].update(await _aget(saver, thread, gets) if api == "aput" else _get(saver, thread, gets))
        elif name.startswith("sqlite_"):
            mode = name.removeprefix("sqlite_")
            path = str(root / f"{name}-{api}-{r}.sqlite")
            if api == "aput":
                async with AsyncSqliteSaver.from_conn_string(path) as asaver:
                    if mode != "default":
                        await asaver.conn.execute(f"PRAGMA synchronous={mode.upper()}")
                    out[name] = await _adrive(asaver, thread, cps)
                    out[name].update(await _aget(asaver, thread, gets))
                    async with asaver.conn.execute("PRAGMA synchronous") as cur:
                        level = (await cur.fetchone() or (-1,))[0]
            else:
                with SqliteSaver.from_conn_string(path) as ssaver:
                    if mode != "default":
                        ssaver.conn.execute(f"PRAGMA synchronous={mode.upper()}")
                    out[name] = _drive(ssaver, thread, cps)
                    out[name].update(_get(ssaver, thread, gets))
                    level = ssaver.conn.execute("PRAGMA synchronous").fetchone()[0]
            out[name]["synchronous"] = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(int(level), str(level))
        else:
            memory = InMemorySaver()
            out[name] = await _adrive(memory, thread, cps) if api == "aput" else _drive(memory, thread, cps)
            out[name].update(await _aget(memory, thread, gets) if api == "aput" else _get(memory, thread, gets))
    return out


async def _measure(puts: int, rounds: int, root: Path, daemon: PrivateDaemon, gets: int) -> dict[str, Any]:
    cps = _checkpoints(puts)
    results: dict[str, Any] = {}
    for api in ("aput", "put"):
        per_round = [await _round(r, puts, root, daemon, api, cps, gets) for r in range(rounds)]
        results[api] = {}
        for name in SAVERS:
            runs = [pr[name] for pr in per_round]
            merged: dict[str, Any] = {k: round(statistics.median(run[k] for run in runs), 3)
                                      for k in ("p50_ms", "p99_ms", "puts_per_s", "get_p50_ms", "client_cpu_us",
                                                "daemon_cpu_us") if k in runs[0]}
            if "synchronous" in runs[0]:
                merged["synchronous"] = runs[0]["synchronous"]
            results[api][name] = merged
        for ours, peer in PEERS.items():
            ratio = results[api][ours]["p50_ms"] / results[api][peer]["p50_ms"]
            results[api][f"{ours}_p50_vs_{peer}"] = round(ratio, 3)
    return results


def run(args: argparse.Namespace) -> int:
    if args.puts < 20:
        raise ConfigError("--puts must be at least 20")
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-lg-") as tmp, \
            PrivateDaemon(Path(tmp) / "daemon", config=POLICY) as daemon:
        result = asyncio.run(_measure(args.puts, max(1, args.rounds), Path(tmp), daemon, max(0, args.gets)))
    result["puts"] = args.puts
    result["rounds"] = args.rounds
    result["gets"] = args.gets
    result["targets"] = {"autosaved_logged_p50_vs_sqlite_full": "<= 1.0",
                         "autosaved_accepted_p50_vs_sqlite_default": "<= 1.0"}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.puts} checkpoints on one thread per saver, the savers in turn, {args.rounds} rounds "
          "(median of the rounds)")
    for api in ("aput", "put"):
        r = result[api]
        get = "get_tuple" if api == "put" else "aget_tuple"
        print(f"  {api:<4} {'saver':<20} {'durability':<34} {'p50 ms':>8} {'p99 ms':>8} {'calls/s':>9} "
              f"{get + ' p50 ms':>18}")
        for name in SAVERS:
            print(f"       {name:<20} {_DURABILITY[name](r[name]):<34} {r[name]['p50_ms']:>8} {r[name]['p99_ms']:>8} "
                  f"{r[name]['puts_per_s']:>9} {r[name].get('get_p50_ms', '-'):>18}")
        for ours, peer in PEERS.items():
            key = f"{ours}_p50_vs_{peer}"
            print(f"       {ours} p50 / {peer} p50 = {r[key]} (target <= 1.0)")
        for ours in PEERS:
            print(f"       {ours}: CPU per {api} {r[ours]['client_cpu_us']:.0f} us in this process (its ZeroMQ thread "
                  f"included), {r[ours]['daemon_cpu_us']:.0f} us in the daemon")
    return 0


_DURABILITY: dict[str, Callable[[dict[str, Any]], str]] = {
    "autosaved_logged": lambda r: "fdatasync per put (power loss)",
    "sqlite_full": lambda r: f"synchronous={r['synchronous']} (power loss)",
    "autosaved_accepted": lambda r: "daemon memory (process crash)",
    "sqlite_normal": lambda r: f"synchronous={r['synchronous']} (process crash)",
    "sqlite_default": lambda r: f"LangGraph's setup: synchronous={r['synchronous']}",
    "memory": lambda r: "none (the floor)",
}
