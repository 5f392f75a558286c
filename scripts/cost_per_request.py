"""What one request costs the client and the daemon, in figures a busy host does not blur much (issue 21).

    python scripts/cost_per_request.py [--count 1500] [--what put,small,eight,pair] [--waits accepted,logged]
                                        [--threads]

Runs a private daemon and, one after the other: ``put`` (LangGraph ``AutosavedSaver.put`` of the checkpoints
``autosaved bench langgraph`` uses), ``small`` (``Client.update`` of ``bench small``'s delta) at each ``--waits``
level, ``eight`` (``bench small``'s ``logged`` throughput window with 1 and then 8 client processes), and
``pair`` (two clients of one job in two threads sending a ``logged`` update at once, round after round: the
median of the slower one's latency, two syncs when the second record's batch starts right after the
first's).
Per request it prints the CPU time of the client process and of the daemon (all their threads, from
``/proc/<pid>/task/*/schedstat``, in µs) and their voluntary context switches (thread switches: each
hand-off between threads, each wait for the GIL or the disk), beside the p50/p90/mean latency, which the
host's load does blur. ``--threads`` adds the same per thread (libzmq names its I/O thread ``ZMQbg/IO/0``; the
daemon's main thread is marked ``*``). Needs ``pip install 'autosaved[langgraph]'`` for ``put``.
Compare two trees by running it with ``PYTHONPATH=<tree>`` for each, alternately, on one host: the private
daemon runs the same tree as the client (``PYTHONSAFEPATH``: not the working directory's).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import autosaved
from autosaved import Client
from autosaved.bench.small import _DAEMON_CONFIG, logged_per_s, small_delta
from autosaved.testing.private import PrivateDaemon

Threads = dict[str, tuple[str, int, int]]


def per_thread(pid: int) -> Threads:
    """tid -> (name, CPU ns, voluntary switches) of every thread of ``pid``."""
    out: Threads = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        tid = task.rsplit("/", 1)[1]
        try:
            with open(f"{task}/comm") as f:
                name = f.read().strip() + ("*" if tid == str(pid) else "")
            with open(f"{task}/schedstat") as f:
                cpu = int(f.read().split()[0])
            with open(f"{task}/status") as f:
                vcs = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        out[tid] = (name, cpu, vcs)
    return out


def _delta(before: Threads, after: Threads, n: float) -> tuple[float, float, list[str]]:
    cpu = vcs = 0.0
    rows = []
    for tid, (name, c, v) in after.items():
        c0, v0 = before.get(tid, (name, 0, 0))[1:]
        cpu, vcs = cpu + c - c0, vcs + v - v0
        if c > c0 or v > v0:
            rows.append(f"{name}:{tid} {(c - c0) / n / 1e3:.0f}us {(v - v0) / n:.2f}sw")
    return cpu / n / 1e3, vcs / n, rows


def measure(label: str, run: Callable[[], list[float]], n: int, daemon_pid: int, threads: bool) -> None:
    me = os.getpid()
    c0, d0 = per_thread(me), per_thread(daemon_pid)
    latencies = sorted(run())
    c1, d1 = per_thread(me), per_thread(daemon_pid)
    ccpu, cvcs, crows = _delta(c0, c1, n)
    dcpu, dvcs, drows = _delta(d0, d1, n)
    out: dict[str, Any] = {"what": label, "p50_ms": 1e3 * latencies[len(latencies) // 2],
                           "p90_ms": 1e3 * latencies[int(0.9 * len(latencies))],
                           "mean_ms": 1e3 * sum(latencies) / len(latencies),
                           "client_cpu_us": ccpu, "client_switches": cvcs,
                           "daemon_cpu_us": dcpu, "daemon_switches": dvcs}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}), flush=True)
    if threads:
        print("   client:", "; ".join(crows))
        print("   daemon:", "; ".join(drows))


def _timed(call: Callable[[int], object], start: int, n: int) -> Callable[[], list[float]]:
    def run() -> list[float]:
        latencies = []
        for i in range(start, start + n):
            t = time.perf_counter()
            call(i)
            latencies.append(time.perf_counter() - t)
        return latencies
    return run


def pair(address: str, rounds: int) -> dict[str, float]:
    import threading

    clients = [Client("pair", address=address) for _ in range(2)]
    try:
        for c in clients:
            for i in range(20):
                c.update(small_delta(i), wait="logged")
        together = threading.Barrier(2)
        latencies: list[list[float]] = [[], []]

        def run(k: int) -> None:
            for i in range(rounds):
                together.wait()
                t = time.perf_counter()
                clients[k].update(small_delta(i), wait="logged")
                latencies[k].append(time.perf_counter() - t)

        workers = [threading.Thread(target=run, args=(k,)) for k in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        slower = sorted(max(a, b) for a, b in zip(*latencies, strict=True))
        return {"slower_p50_ms": round(1e3 * slower[len(slower) // 2], 3),
                "slower_p90_ms": round(1e3 * slower[int(0.9 * len(slower))], 3)}
    finally:
        for c in clients:
            c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=1500, help="requests per measure (default 1500)")
    p.add_argument("--what", default="put,small,eight,pair", help="put, small, eight and/or pair (default: all)")
    p.add_argument("--waits", default="accepted,logged", help="ack levels for put and small")
    p.add_argument("--seconds", type=float, default=2.0, help="the window of eight (default 2 s)")
    p.add_argument("--threads", action="store_true", help="per thread too")
    args = p.parse_args()
    what, n, warm = args.what.split(","), args.count, 20
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)
    # The daemon runs the tree this script imports (not whatever the working directory holds: ``python -m``
    # would put it first on the path).
    tree = str(Path(autosaved.__file__).resolve().parent.parent)
    env = {"PYTHONSAFEPATH": "1", "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
    with PrivateDaemon(config=_DAEMON_CONFIG, env=env) as daemon:
        assert daemon.proc is not None
        pid = daemon.proc.pid
        for wait in args.waits.split(","):
            if "put" in what:
                from autosaved.bench.langgraph import _checkpoints, _configs
                from autosaved.integrations.langgraph import AutosavedSaver

                cps = _checkpoints(n + warm)
                configs = _configs(f"t-{wait}", len(cps), [cp["id"] for cp, _, _ in cps])
                with AutosavedSaver(f"put-{wait}", address=daemon.address, wait=wait) as saver:
                    def put(i: int, saver: AutosavedSaver = saver, configs: Any = configs, cps: Any = cps) -> object:
                        return saver.put(configs[i], *cps[i])
                    _timed(put, 0, warm)()
                    measure(f"put {wait}", _timed(put, warm, n), n, pid, args.threads)
            if "small" in what:
                with Client(f"small-{wait}", address=daemon.address) as client:
                    def update(i: int, client: Client = client, wait: str = wait) -> object:
                        return client.update(small_delta(i), wait=wait)
                    _timed(update, 0, warm)()
                    measure(f"small {wait}", _timed(update, warm, n), n, pid, args.threads)
        if "pair" in what:
            print(json.dumps({"what": "two logged writers of one job", **pair(daemon.address, n)}), flush=True)
        if "eight" in what:
            for clients in (1, 8):
                before = per_thread(pid)
                rate = logged_per_s(daemon.address, clients, args.seconds, f"c{clients}")
                cpu, vcs, rows = _delta(before, per_thread(pid), rate * args.seconds)
                print(json.dumps({"what": f"logged, {clients} client processes", "per_s": round(rate),
                                  "daemon_cpu_us": round(cpu), "daemon_switches": round(vcs, 2)}), flush=True)
                if args.threads:
                    print("   daemon:", "; ".join(rows))
        daemon.stop()


if __name__ == "__main__":
    main()
