"""An LLM-agent style task that resumes at the right stage after being killed.

Each stage stands in for slow, costly model calls. After every stage the pipeline tells autosaved what
it finished (``current_stage``, ``completed_steps``, ``output_cache``) and waits until the daemon has
committed it, so a stage that was reported done is never paid for twice.

    python examples/agent_pipeline.py --task "summarise the design"
    # kill -9 it in the middle; run it again: finished stages are skipped
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time

import autosaved

STAGES = ["plan", "research", "draft", "critique", "revise", "final"]


def run_stage(stage: str, task: str, cache: dict[str, str]) -> str:
    """A stand-in for a model call: deterministic output from the task and earlier outputs."""
    prior = "|".join(cache[s] for s in STAGES if s in cache)
    return hashlib.sha256(f"{stage}:{task}:{prior}".encode()).hexdigest()[:12]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="agent-task")
    parser.add_argument("--address")
    parser.add_argument("--task", default="summarise the design brief")
    parser.add_argument("--stage-seconds", type=float, default=0.5, help="how long each simulated stage takes")
    args = parser.parse_args()

    with autosaved.Client(args.job, address=args.address) as ckpt:
        progress = ckpt.restore() or {"task": args.task, "current_stage": None, "completed_steps": [],
                                      "output_cache": {}}
        done = list(progress["completed_steps"])
        cache = dict(progress["output_cache"])
        print(f"resuming after {done}" if done else "starting fresh", flush=True)
        for stage in STAGES:
            if stage in done:
                continue
            ckpt.update({"current_stage": stage, "task": args.task}, meta={"stage": stage})
            print(f"running {stage}", flush=True)
            time.sleep(args.stage_seconds)
            cache[stage] = run_stage(stage, args.task, cache)
            done.append(stage)
            ckpt.update({"completed_steps": done, "output_cache": {stage: cache[stage]}},
                        step=len(done), meta={"stage": stage}, wait="committed")
            print(f"finished {stage} -> {cache[stage]}", flush=True)
        ckpt.update({"current_stage": "done"}, wait="committed")
    print(f"result {cache['final']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
