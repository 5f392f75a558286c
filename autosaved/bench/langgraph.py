"""``autosaved bench langgraph [--puts 500] [--json]``: LangGraph checkpointers side by side, in one run.

The same sequence of checkpoints (one agent thread: a message window that changes every step, a step
counter, and a context channel written once) goes through ``aput`` of each saver in turn:
``AutosavedSaver`` at ``wait="logged"`` and at ``wait="accepted"`` (a private daemon in a temp dir),
LangGraph's ``AsyncSqliteSaver`` (a file in the same temp dir; WAL journal, its defaults) and
``InMemorySaver`` (no persistence: the floor). Reported: p50/p99 latency of one ``aput`` and puts per second.
Targets (issue 11): at ``logged``, p50 ≤ the SQLite saver's; at ``accepted``, ≤ 0.5 times it.
Needs ``pip install 'autosaved[langgraph]' langgraph-checkpoint-sqlite``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ..testing.private import PrivateDaemon

POLICY = '[policy]\ninterval = "60s"\nidle = "5s"\nmin_gap = "5s"\n'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--puts", type=int, default=500, help="checkpoints per saver (default 500)")
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


async def _drive(saver: Any, thread: str, cps: list[Any], warmup: int = 5) -> dict[str, float]:
    latencies = []
    parent: str | None = None
    start = 0.0
    for i, (cp, meta, new) in enumerate(cps):
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": "",
                                   **({"checkpoint_id": parent} if parent else {})}}
        if i == warmup:
            start = time.perf_counter()
        t = time.perf_counter()
        stored = await saver.aput(config, cp, meta, new)
        if i >= warmup:
            latencies.append(time.perf_counter() - t)
        parent = stored["configurable"]["checkpoint_id"]
    total = time.perf_counter() - start
    latencies.sort()
    return {"p50_ms": round(1e3 * statistics.median(latencies), 3),
            "p99_ms": round(1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3),
            "puts_per_s": round(len(latencies) / total, 1)}


async def _measure(puts: int, root: Path, address: str) -> dict[str, Any]:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from ..integrations.langgraph import AutosavedSaver

    cps = _checkpoints(puts)
    results: dict[str, Any] = {}
    for wait in ("logged", "accepted"):
        with AutosavedSaver("bench-langgraph", address=address, wait=wait) as saver:
            results[f"autosaved_{wait}"] = await _drive(saver, f"thread-{wait}", cps)
    async with AsyncSqliteSaver.from_conn_string(str(root / "checkpoints.sqlite")) as sqlite:
        results["sqlite"] = await _drive(sqlite, "thread-sqlite", cps)
    results["memory"] = await _drive(InMemorySaver(), "thread-memory", cps)
    return results


def run(args: argparse.Namespace) -> int:
    if args.puts < 20:
        raise SystemExit("--puts must be at least 20")
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-lg-") as tmp, \
            PrivateDaemon(Path(tmp) / "daemon", config=POLICY) as daemon:
        result = asyncio.run(_measure(args.puts, Path(tmp), daemon.address))
    sqlite_p50 = result["sqlite"]["p50_ms"]
    result["puts"] = args.puts
    result["logged_p50_vs_sqlite"] = round(result["autosaved_logged"]["p50_ms"] / sqlite_p50, 3)
    result["accepted_p50_vs_sqlite"] = round(result["autosaved_accepted"]["p50_ms"] / sqlite_p50, 3)
    result["targets"] = {"logged_p50_vs_sqlite": "<= 1.0", "accepted_p50_vs_sqlite": "<= 0.5"}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"aput of {args.puts} checkpoints on one thread, each saver in turn (same checkpoints)")
    print(f"  {'saver':<22} {'p50 ms':>8} {'p99 ms':>8} {'puts/s':>9}")
    for name in ("autosaved_logged", "autosaved_accepted", "sqlite", "memory"):
        r = result[name]
        print(f"  {name:<22} {r['p50_ms']:>8} {r['p99_ms']:>8} {r['puts_per_s']:>9}")
    print(f"  logged p50 / sqlite p50 = {result['logged_p50_vs_sqlite']} (target <= 1.0); "
          f"accepted p50 / sqlite p50 = {result['accepted_p50_vs_sqlite']} (target <= 0.5)")
    return 0
