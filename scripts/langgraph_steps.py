"""What a LangGraph run costs through ``AutosavedSaver``: requests per ``invoke`` and its latency (issue 21).

    python scripts/langgraph_steps.py [--invokes 100] [--wait accepted] [--one-thread] [--async]

A 4-node chain (``a`` → ``b`` → ``c`` → ``d``) compiled with the saver, invoked with ``durability="sync"``
(each step's ``put_writes`` and ``put`` return at ``--wait`` before the next step), on a new thread per
invoke or, with ``--one-thread``, all on one thread (each invoke then resumes it: a ``get_tuple`` of a
thread with history). Prints the invoke p50 and the requests one invoke sent (the client's request
counter). Compare two trees by running it from each, alternately (``PYTHONPATH=<tree>``).
Needs ``pip install 'autosaved[langgraph]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import operator
import os
import statistics
import time
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph

from autosaved.bench.small import _DAEMON_CONFIG
from autosaved.integrations.langgraph import AutosavedSaver
from autosaved.testing.private import PrivateDaemon


class State(TypedDict):
    log: Annotated[list[str], operator.add]


def graph(saver: AutosavedSaver) -> Any:
    g = StateGraph(State)
    names = ["a", "b", "c", "d"]
    for name in names:
        g.add_node(name, lambda s, name=name: {"log": [name]})
    g.add_edge(START, names[0])
    for x, y in itertools.pairwise(names):
        g.add_edge(x, y)
    g.add_edge(names[-1], END)
    return g.compile(checkpointer=saver)


async def measure(args: argparse.Namespace, saver: AutosavedSaver) -> tuple[list[float], int]:
    compiled = graph(saver)
    latencies: list[float] = []
    requests = 0
    for i in range(args.invokes + 5):
        config = {"configurable": {"thread_id": "one" if args.one_thread else f"t{i}"}}
        before = saver._client._core.seq + sum(c._core.seq for _, c in saver._aio.values())
        start = time.perf_counter()
        if args.use_async:
            await compiled.ainvoke({"log": []}, config, durability="sync")
        else:
            compiled.invoke({"log": []}, config, durability="sync")
        if i >= 5:  # the first invokes warm up (imports, the first connection)
            latencies.append(time.perf_counter() - start)
        requests = saver._client._core.seq + sum(c._core.seq for _, c in saver._aio.values()) - before
    return latencies, requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--invokes", type=int, default=100)
    p.add_argument("--wait", default="accepted", choices=("accepted", "logged"))
    p.add_argument("--one-thread", action="store_true", help="every invoke on one thread (resumes it)")
    p.add_argument("--async", dest="use_async", action="store_true", help="ainvoke (the saver's async methods)")
    args = p.parse_args()
    with PrivateDaemon(config=_DAEMON_CONFIG) as daemon, \
            AutosavedSaver("steps", address=daemon.address, wait=args.wait) as saver:
        latencies, requests = asyncio.run(measure(args, saver))
        daemon.stop()
    print(json.dumps({"wait": args.wait, "one_thread": args.one_thread, "async": args.use_async,
                      "invoke_p50_ms": round(1e3 * statistics.median(latencies), 3),
                      "requests_per_invoke": requests, "load": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
