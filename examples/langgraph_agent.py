"""A LangGraph agent whose every step is checkpointed in the autosaved daemon; kill it and run it again
and it resumes on its thread from the last checkpoint.

    autosaved serve &                                   # or a systemd-managed daemon
    python examples/langgraph_agent.py --thread t1      # kill it with SIGKILL at any point...
    python examples/langgraph_agent.py --thread t1      # ...and it resumes where it stopped

The graph: ``plan`` → (``search`` ∥ ``draft``) → ``review`` → ``finish``; each stage appends to ``log``.
``--block NODE`` makes that node wait (after the other branch's writes are saved) so a test can kill the
process mid-step; ``--async`` drives the graph with ``ainvoke`` (the saver's async methods).

Needs ``pip install 'autosaved[langgraph]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import operator
import sys
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph

from autosaved import Client
from autosaved.integrations.langgraph import AutosavedSaver


class State(TypedDict):
    topic: str
    log: Annotated[list[str], operator.add]
    score: Annotated[int, operator.add]


def build(args: argparse.Namespace, saver: AutosavedSaver) -> Any:
    def node(name: str, points: int) -> Any:
        def run(state: State) -> dict[str, Any]:
            if args.effects:  # side effects, to show a finished branch is not run again after a resume
                with open(args.effects, "a") as f:
                    f.write(f"{args.thread} {name}\n")
            if args.block == name:
                # Wait until the parallel branch's writes are in the daemon, then tell the test and hang.
                with Client(saver.job, address=saver.address) as probe:
                    latest = probe.restore(path=("threads", args.thread, "latest", ""))
                    while not probe.restore(path=("threads", args.thread, "w", "", latest)):
                        time.sleep(0.02)
                print(f"blocked at {name}", flush=True)
                time.sleep(600)
            return {"log": [f"{name}:{state['topic']}"], "score": points}

        return run

    g = StateGraph(State)
    for name, points in (("plan", 1), ("search", 10), ("draft", 100), ("review", 1000), ("finish", 10000)):
        g.add_node(name, node(name, points))
    g.add_edge(START, "plan")
    g.add_edge("plan", "search")
    g.add_edge("plan", "draft")
    g.add_edge(["search", "draft"], "review")
    g.add_edge("review", "finish")
    g.add_edge("finish", END)
    return g.compile(checkpointer=saver)


def history(graph: Any, thread: str) -> list[dict[str, Any]]:
    """The thread's checkpoints, oldest first, without ids and times (those differ between runs)."""
    config = {"configurable": {"thread_id": thread}}
    return [{"step": s.metadata["step"], "source": s.metadata["source"], "values": s.values, "next": list(s.next)}
            for s in reversed(list(graph.get_state_history(config)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--thread", default="t1")
    p.add_argument("--job", default="langgraph-example")
    p.add_argument("--address", default=None)
    p.add_argument("--wait", default="logged", choices=["accepted", "logged", "committed"])
    p.add_argument("--block", default=None, help="hang in this node (for kill tests)")
    p.add_argument("--effects", type=Path, default=None, help="append each node run to this file")
    p.add_argument("--async", dest="use_async", action="store_true", help="drive the graph with ainvoke")
    p.add_argument("--history", action="store_true", help="print the thread's checkpoint history as JSON")
    args = p.parse_args()

    with AutosavedSaver(args.job, address=args.address, wait=args.wait) as saver:
        graph = build(args, saver)
        config = {"configurable": {"thread_id": args.thread}}
        existing = graph.get_state(config)
        # A new thread starts from the input; a thread with a checkpoint resumes from it (input None).
        inputs = None if existing.created_at else {"topic": "checkpoints", "log": [], "score": 0}
        print("resuming" if inputs is None else "starting", f"thread {args.thread}", flush=True)
        if args.use_async:
            final = asyncio.run(graph.ainvoke(inputs, config, durability="sync"))
        else:
            final = graph.invoke(inputs, config, durability="sync")
        print("final", json.dumps(final, sort_keys=True), flush=True)
        if args.history:
            print("history", json.dumps(history(graph, args.thread), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
