"""``autosaved bench history [--checkpoints 10000] [--formats 1,2] [--json]``: cost of a put as history grows.

One LangGraph thread (a 9-message window that changes every step, a step counter, a long context written
once: the shape of :mod:`.langgraph`) is filled to 1,000, 10,000 and, when asked, 100,000 checkpoints in
an ``AutosavedSaver`` on a private daemon (one per store format, ``storage_format``, side by side in one
run), a ``SqliteSaver`` with ``synchronous=FULL`` (each put durable, like ``logged``) and an
``AsyncSqliteSaver`` (its defaults). At each size: put p50/p99 at ``logged`` and ``accepted`` (100 puts
each), the bytes one save writes after 100 puts next to the payload those 100 checkpoints added (their
serialized values), ``get_tuple`` latency, and the daemon's RSS. Targets (issue 20): put p50 flat in the
history, bytes per save <= 3x the payload added, and RSS growth <= 2x the history's payload.
Needs ``pip install 'autosaved[langgraph]' langgraph-checkpoint-sqlite``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..testing.private import PrivateDaemon

CONFIG = '[policy]\ninterval = "off"\nidle = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\nkeep_last = 2\n'
SIZES = (1000, 10_000, 100_000)
MEASURED = 100  # puts per latency sample, and puts between the two saves whose second one is measured


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoints", type=int, default=10_000,
                   help="largest history to fill to (sizes 1000, 10000, 100000 up to it; default 10000)")
    p.add_argument("--formats", default="1,2", help="autosaved store formats to run, side by side (default 1,2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


_CONTEXT = {"system": "You are a careful research agent. " * 60}


def checkpoint(i: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Step ``i`` of the thread: (checkpoint, metadata, new_versions)."""
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.base.id import uuid6

    cp: dict[str, Any] = dict(empty_checkpoint())
    cp["id"] = str(uuid6(clock_seq=-1))
    window = [{"role": "user" if j % 2 else "assistant", "content": f"turn {j}: " + "lorem ipsum " * 15}
              for j in range(max(0, i - 8), i + 1)]
    cp["channel_values"] = {"messages": window, "step": i, "context": _CONTEXT}
    versions = {"messages": f"{i + 1:032}.0", "step": f"{i + 1:032}.0", "context": f"{1:032}.0"}
    cp["channel_versions"] = versions
    new = {k: v for k, v in versions.items() if i == 0 or k != "context"}
    return cp, {"source": "loop", "step": i, "parents": {}}, new


def payload(i: int) -> int:
    """Bytes step ``i`` adds to the history: its serialized new channel values and checkpoint record."""
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    serde = JsonPlusSerializer()
    cp, meta, new = checkpoint(i)
    values = sum(len(serde.dumps_typed(cp["channel_values"][k])[1]) for k in new)
    record = {k: v for k, v in cp.items() if k != "channel_values"}
    return values + len(serde.dumps_typed(record)[1]) + len(serde.dumps_typed(meta)[1])


class Thread:
    """One saver's thread: puts step after step, each with its parent."""

    def __init__(self, name: str, put: Callable[..., Any], get: Callable[..., Any]) -> None:
        self.name = name
        self.put_fn = put
        self.get_fn = get
        self.parent: str | None = None
        self.steps = 0

    def config(self) -> dict[str, Any]:
        return {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                                 **({"checkpoint_id": self.parent} if self.parent else {})}}

    def put(self, n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            cp, meta, new = checkpoint(self.steps)
            t = time.perf_counter()
            stored = self.put_fn(self.config(), cp, meta, new)
            latencies.append(time.perf_counter() - t)
            self.parent = stored["configurable"]["checkpoint_id"]
            self.steps += 1
        return latencies

    def get(self, n: int) -> list[float]:
        latencies = []
        for _ in range(n):
            t = time.perf_counter()
            got = self.get_fn({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
            latencies.append(time.perf_counter() - t)
            assert got is not None and got.checkpoint["id"] == self.parent
        return latencies


def _ms(latencies: list[float]) -> dict[str, float]:
    s = sorted(latencies)
    return {"p50_ms": round(1e3 * statistics.median(s), 3),
            "p99_ms": round(1e3 * s[min(len(s) - 1, int(0.99 * len(s)))], 3)}


def _autosaved(fmt: int, sizes: list[int], root: Path) -> list[dict[str, Any]]:
    import psutil

    from ..client.sync import Client
    from ..integrations.langgraph import AutosavedSaver

    out = []
    with PrivateDaemon(root / f"daemon-{fmt}", config=f"storage_format = {fmt}\n" + CONFIG) as daemon, \
            AutosavedSaver("history", address=daemon.address, wait="accepted") as saver, \
            Client("history", address=daemon.address, timeout=120, save_timeout=600) as admin:
        assert daemon.proc is not None
        proc = psutil.Process(daemon.proc.pid)
        thread = Thread(f"autosaved_f{fmt}", saver.put, saver.get_tuple)
        rss0 = proc.memory_info().rss
        for size in sizes:
            thread.put(size - thread.steps - 2 * MEASURED)  # filled at "accepted"; saves now and then
            admin.save()
            saver.wait = "logged"
            logged = thread.put(MEASURED)
            saver.wait = "accepted"
            before = admin.status()["bytes_written"]
            t = time.perf_counter()
            admin.save()  # what the 100 puts above added
            save_s = time.perf_counter() - t
            written = admin.status()["bytes_written"] - before
            accepted = thread.put(MEASURED)
            gets = thread.get(50)
            out.append({"checkpoints": thread.steps, "logged": _ms(logged), "accepted": _ms(accepted),
                        "save_after_100_bytes": written, "save_after_100_s": round(save_s, 3),
                        "get_tuple": _ms(gets), "daemon_rss_mb": round(proc.memory_info().rss / 2**20, 1),
                        "daemon_rss_growth_mb": round((proc.memory_info().rss - rss0) / 2**20, 1)})
    return out


def _sqlite_full(sizes: list[int], root: Path) -> list[dict[str, Any]]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(root / "full.sqlite", check_same_thread=False)
    saver = SqliteSaver(conn)
    saver.setup()
    conn.execute("PRAGMA synchronous=FULL")
    thread = Thread("sqlite_full", saver.put, saver.get_tuple)
    out = []
    for size in sizes:
        thread.put(size - thread.steps - MEASURED)
        puts = thread.put(MEASURED)
        out.append({"checkpoints": thread.steps, "put": _ms(puts), "get_tuple": _ms(thread.get(50)),
                    "db_mb": round(os.path.getsize(root / "full.sqlite") / 2**20, 1)})
    conn.close()
    return out


async def _async_sqlite(sizes: list[int], root: Path) -> list[dict[str, Any]]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    out = []
    async with AsyncSqliteSaver.from_conn_string(str(root / "async.sqlite")) as saver:
        parent: str | None = None
        steps = 0

        async def put(n: int) -> list[float]:
            nonlocal parent, steps
            lat = []
            for _ in range(n):
                cp, meta, new = checkpoint(steps)
                config = {"configurable": {"thread_id": "t", "checkpoint_ns": "",
                                           **({"checkpoint_id": parent} if parent else {})}}
                t = time.perf_counter()
                stored = await saver.aput(config, cp, meta, new)  # type: ignore[arg-type]
                lat.append(time.perf_counter() - t)
                parent = stored["configurable"]["checkpoint_id"]
                steps += 1
            return lat

        for size in sizes:
            await put(size - steps - MEASURED)
            puts = await put(MEASURED)
            gets = []
            for _ in range(50):
                t = time.perf_counter()
                await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
                gets.append(time.perf_counter() - t)
            out.append({"checkpoints": steps, "put": _ms(puts), "get_tuple": _ms(gets)})
    return out


def run(args: argparse.Namespace) -> int:
    sizes = [s for s in SIZES if s <= args.checkpoints] or [args.checkpoints]
    if min(sizes) < 4 * MEASURED:
        raise SystemExit(f"--checkpoints must be at least {4 * MEASURED}")
    formats = [int(f) for f in str(args.formats).split(",") if f.strip()]
    per_step = statistics.mean(payload(i) for i in range(20, 40))
    result: dict[str, Any] = {"sizes": sizes, "payload_per_checkpoint": round(per_step),
                              "payload_of_100": round(100 * per_step), "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-history-") as tmp:
        root = Path(tmp)
        for fmt in formats:
            result[f"autosaved_format{fmt}"] = _autosaved(fmt, sizes, root)
        result["sqlite_full"] = _sqlite_full(sizes, root)
        result["async_sqlite"] = asyncio.run(_async_sqlite(sizes, root))
    result["load_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"one LangGraph thread; payload {result['payload_per_checkpoint']} B per checkpoint "
          f"({result['payload_of_100']} B per 100); load {result['load']:.1f} -> {result['load_after']:.1f}")
    print(f"  {'saver':<20} {'checkpoints':>11} {'logged p50/p99 ms':>18} {'accepted p50/p99':>17} "
          f"{'save after 100':>20} {'get_tuple p50':>13} {'RSS MB':>7}")
    for fmt in formats:
        for r in result[f"autosaved_format{fmt}"]:
            print(f"  {'autosaved format ' + str(fmt):<20} {r['checkpoints']:>11} "
                  f"{r['logged']['p50_ms']:>8}/{r['logged']['p99_ms']:<9} "
                  f"{r['accepted']['p50_ms']:>7}/{r['accepted']['p99_ms']:<9} "
                  f"{r['save_after_100_bytes'] / 1e6:>8.3f} MB {r['save_after_100_s']:>6.2f} s "
                  f"{r['get_tuple']['p50_ms']:>13} {r['daemon_rss_mb']:>7}")
    for name in ("sqlite_full", "async_sqlite"):
        for r in result[name]:
            print(f"  {name:<20} {r['checkpoints']:>11} {r['put']['p50_ms']:>8}/{r['put']['p99_ms']:<9} "
                  f"{'':>17} {'':>20} {r['get_tuple']['p50_ms']:>13}")
    return 0
