"""``autosaved bench small [--json]``: small updates against their floors, side by side in one run.

An agent pipeline records its progress after every small action, so what counts is the latency of one
small ``update()`` and how many ``logged`` updates a host sustains. Measured on a private daemon in a temp
dir, with the floors measured in the same run:

- ``rtt_s``: median round trip of a small message over a raw ZeroMQ DEALER → ROUTER pair on an ipc socket,
  both ends in Python, the ROUTER in its own process (the floor for any request to a daemon);
- ``async_rtt_s`` (extra): the same with the ROUTER on anyio + ``zmq.asyncio`` (await poll, recv, send), the
  daemon's rpc loop before issue 14: what that architecture costs by itself;
- ``loop_rtt_s`` (extra): the same with the ROUTER written like the daemon's rpc loop now (a plain socket whose
  fd the asyncio loop watches, drained and answered without blocking from the fd callback): the part of
  the gap to ``rtt_s`` that is the event loop's, not the request handling's;
- ``fsync_s``: median ``write`` of 200 bytes + ``fdatasync`` on an append-only file in the daemon's state
  dir (the floor for making a small record durable);
- ``sync_echo_s`` (extra): the round trip through a plain-Python ROUTER that appends each message to a file
  and fdatasyncs it from a second thread, which then replies (the daemon's shape, without the daemon): what
  ``rtt_s + fsync_s`` costs on this host once a thread hand-off and the disk's wake-ups are in the path;
- ``accepted_p50_s`` / ``accepted_p99_s``: ``update(delta, wait="accepted")`` of a ~200-byte delta;
- ``logged_p50_s`` / ``logged_p99_s``: the same with ``wait="logged"``;
- ``logged_1_per_s``: ``logged`` updates per second, one client, back to back;
- ``logged_8_per_s``: the same with 8 client processes at once, each its own job (8 agents on one host).

Floors: ``accepted`` p50 ≈ ``rtt_s``; ``logged`` p50 ≈ ``rtt_s + fsync_s`` (the issue's), ≈ ``sync_echo_s``
(this design's, measured).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..client.admin import Admin
from ..client.sync import Client
from ..fmt import print_json, table
from ..testing.private import PrivateDaemon

KEYS = ("rtt_s", "fsync_s", "accepted_p50_s", "accepted_p99_s", "logged_p50_s", "logged_p99_s",
        "logged_1_per_s", "logged_8_per_s")
CLIENTS = 8
# Nothing saves on its own during the run, so every figure is the small-update path alone.
_DAEMON_CONFIG = ('[policy]\nidle = "off"\ninterval = "off"\ndirty_bytes = "off"\nmin_gap = "0s"\n'
                  '[throttle]\nenabled = false\n')

# A ROUTER that answers every message with its own frames, in a process of its own like the daemon.
_ECHO = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    frames = s.recv_multipart(copy=False)
    if frames[1].bytes == b"stop":
        break
    s.send_multipart(frames, copy=False)
"""

# The same echo written the way the daemon's rpc loop is (anyio on asyncio, zmq.asyncio poll-then-recv):
# what the event-loop architecture costs by itself, before any request handling.
_ASYNC_ECHO = """
import sys, anyio, zmq, zmq.asyncio
async def main():
    s = zmq.asyncio.Context().socket(zmq.ROUTER)
    s.bind(sys.argv[1])
    print("ready", flush=True)
    while True:
        if not await s.poll(1000):
            continue
        frames = await s.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            break
        await s.send_multipart(frames, copy=False)
anyio.run(main, backend="asyncio")
"""

# The echo written the way the daemon's rpc loop is now (daemon/rpcsocket.py): a plain socket, its fd watched
# by the event loop, every ready message received and answered without blocking from the fd callback.
_LOOP_ECHO = """
import sys, asyncio, zmq
async def main():
    s = zmq.Context().socket(zmq.ROUTER)
    s.bind(sys.argv[1])
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    def drain():
        while s.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
            if frames[1].bytes == b"stop":
                done.done() or done.set_result(None)
                return
            s.send_multipart(frames, zmq.NOBLOCK, copy=False)
    loop.add_reader(s.getsockopt(zmq.FD), drain)
    print("ready", flush=True)
    drain()
    await done
asyncio.run(main())
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=2000, help="updates per latency measure (default 2000)")
    p.add_argument("--seconds", type=float, default=3.0, help="length of each throughput window (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def small_delta(i: int) -> dict[str, Any]:
    """About 200 bytes of agent progress, different every time (as a pipeline's would be)."""
    return {"current_stage": "reasoning", "completed_steps": i, "note": f"step {i} done " + "x" * 120,
            "scores": [0.5, 0.25, float(i)]}


def pct(samples: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``samples``, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def rtt_s(count: int, sock_dir: Path, server: str = _ECHO) -> float:
    """The median round trip of a 200-byte message through ``server`` (an echo, in its own process)."""
    return _echo_rtt_s(count, f"ipc://{sock_dir}/echo.sock", [server])


def _echo_rtt_s(count: int, address: str, argv: list[str]) -> float:
    """Start ``python -c argv[0] address argv[1:]`` (a ROUTER that prints "ready" once bound and answers each
    message), time ``count`` round trips after 100 that pay for the connection, and stop it."""
    import zmq

    proc = subprocess.Popen([sys.executable, "-c", argv[0], address, *argv[1:]], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "ready": bound
        ctx: Any = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        payload = b"x" * 200
        times = []
        for i in range(count + 100):
            t = time.perf_counter()
            sock.send_multipart([payload])
            sock.recv_multipart()
            if i >= 100:
                times.append(time.perf_counter() - t)
        sock.send_multipart([b"stop"])
        sock.close(0)
        proc.wait(10)
        return statistics.median(times)
    finally:
        if proc.poll() is None:  # stopped early (an error, SIGTERM): the server must not outlive the benchmark
            proc.kill()
            proc.wait()


# The floors of this design, in plain Python over the same ZeroMQ ipc socket: a ROUTER that appends each
# message to a file and fdatasyncs it before echoing it, on its one thread, or (the daemon's shape: the
# event loop never waits for the disk) in a second thread that syncs and replies while the first receives.
_SYNC_ECHO = """
import os, queue, sys, threading, zmq
s = zmq.Context().socket(zmq.ROUTER)
s.bind(sys.argv[1])
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
lock, work = threading.Lock(), queue.SimpleQueue()
def sync_and_reply():
    while True:
        frames = work.get()
        os.write(fd, frames[1].bytes)
        os.fdatasync(fd)
        with lock:
            s.send_multipart(frames, copy=False)
threading.Thread(target=sync_and_reply, daemon=True).start()
poller = zmq.Poller()
poller.register(s, zmq.POLLIN)
print("ready", flush=True)
while True:
    poller.poll()
    with lock:
        try:
            frames = s.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            continue
    if frames[1].bytes == b"stop":
        break
    if sys.argv[3] == "thread":
        work.put(frames)
    else:
        os.write(fd, frames[1].bytes)
        os.fdatasync(fd)
        with lock:
            s.send_multipart(frames, copy=False)
"""


def sync_echo_s(count: int, sock_dir: Path, log_dir: Path, how: str = "thread") -> float:
    """The median round trip through :data:`_SYNC_ECHO` (``how``: ``inline`` or ``thread``), its log in
    ``log_dir`` (the daemon's state dir: the same disk)."""
    log = log_dir / "sync-echo.log"
    try:
        return _echo_rtt_s(count, f"ipc://{sock_dir}/sync-echo.sock", [_SYNC_ECHO, str(log), how])
    finally:
        log.unlink(missing_ok=True)


def fsync_s(directory: Path, count: int = 200) -> float:
    path = directory / "fsync-probe.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        record = b"r" * 200
        times = []
        for _ in range(count):
            t = time.perf_counter()
            os.write(fd, record)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        os.close(fd)
        path.unlink()


def latencies(client: Client, count: int, wait: str) -> list[float]:
    for i in range(50):  # warm up: connection, job load, first log segment
        client.update(small_delta(i), wait=wait)
    out = []
    for i in range(count):
        delta = small_delta(i)
        t = time.perf_counter()
        client.update(delta, wait=wait)
        out.append(time.perf_counter() - t)
    return out


def _worker(address: str, job: str, ready: Any, start: Any, stop_at: Any, results: Any) -> None:
    """One client process: warm up, wait for the common start, send ``logged`` updates until the end."""
    with Client(job, address=address, timeout=60) as client:
        for i in range(20):
            client.update(small_delta(i), wait="logged")
        ready.put(job)
        start.wait()
        deadline = stop_at.value
        done = 0
        while time.time() < deadline:
            client.update(small_delta(done), wait="logged")
            done += 1
        results.put(done)


def logged_per_s(address: str, clients: int, seconds: float, tag: str) -> float:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: no state shared with this one
    start = ctx.Event()
    stop_at = ctx.Value("d", 0.0)
    results, ready = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(address, f"small-{tag}-{i}", ready, start, stop_at, results))
             for i in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:  # every client connected and warmed up: the window measures steady state only
        ready.get(timeout=120)
    began = time.time()
    stop_at.value = began + seconds
    start.set()
    counts: list[int] = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
        if p.exitcode != 0:
            raise RuntimeError(f"a bench client exited with {p.exitcode}")
    return sum(counts) / seconds


def measure(count: int, seconds: float, work_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"host": f"{socket.gethostname()} ({os.cpu_count()} cpus)", "count": count,
                           "clients": CLIENTS}
    with PrivateDaemon(work_dir / "daemon", config=_DAEMON_CONFIG) as daemon:
        out["rtt_s"] = rtt_s(count, daemon.sock_dir)
        out["async_rtt_s"] = rtt_s(count, daemon.sock_dir, _ASYNC_ECHO)
        out["loop_rtt_s"] = rtt_s(count, daemon.sock_dir, _LOOP_ECHO)
        out["fsync_s"] = fsync_s(daemon.state_dir)
        out["sync_echo_s"] = sync_echo_s(count, daemon.sock_dir, daemon.state_dir)
        with Client("small", address=daemon.address) as client:
            accepted = latencies(client, count, "accepted")
            logged = latencies(client, max(200, count // 4), "logged")
        out["accepted_p50_s"], out["accepted_p99_s"] = pct(accepted, 0.5), pct(accepted, 0.99)
        out["logged_p50_s"], out["logged_p99_s"] = pct(logged, 0.5), pct(logged, 0.99)
        out["logged_1_per_s"] = logged_per_s(daemon.address, 1, seconds, "one")
        out["logged_8_per_s"] = logged_per_s(daemon.address, CLIENTS, seconds, "eight")
        with Admin(address=daemon.address, timeout=10) as admin:
            d = admin.status()["daemon"]
            out["wal_syncs"], out["wal_records"] = d["wal_syncs"], d["wal_records"]
    return out


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """The issue's targets as ratios (lower is better except the scaling)."""
    return {
        "accepted_p50_over_rtt": r["accepted_p50_s"] / r["rtt_s"],
        "logged_p50_over_rtt_fsync": r["logged_p50_s"] / (r["rtt_s"] + r["fsync_s"]),
        "logged_p50_over_sync_echo": r["logged_p50_s"] / r["sync_echo_s"],
        "logged_8_over_1": r["logged_8_per_s"] / r["logged_1_per_s"],
    }


def render(r: dict[str, Any]) -> str:
    q = ratios(r)
    notes = {
        "accepted_p50_s": f"{q['accepted_p50_over_rtt']:.2f}x rtt_s (target <= 3); "
                          f"{r['accepted_p50_s'] / r['loop_rtt_s']:.2f}x loop_rtt_s",
        "async_rtt_s": f"{r['async_rtt_s'] / r['rtt_s']:.2f}x rtt_s",
        "loop_rtt_s": f"{r['loop_rtt_s'] / r['rtt_s']:.2f}x rtt_s",
        "logged_p50_s": f"{q['logged_p50_over_rtt_fsync']:.2f}x rtt_s+fsync_s (target <= 1.5); "
                        f"{q['logged_p50_over_sync_echo']:.2f}x sync_echo_s",
        "sync_echo_s": f"{r['sync_echo_s'] / (r['rtt_s'] + r['fsync_s']):.2f}x rtt_s+fsync_s",
        "logged_8_per_s": f"{q['logged_8_over_1']:.2f}x logged_1_per_s (target >= 4)",
    }
    rows = []
    for k in (*KEYS[:1], "async_rtt_s", "loop_rtt_s", *KEYS[1:2], "sync_echo_s", *KEYS[2:]):
        v = r[k]
        shown = f"{v:.0f}" if k.endswith("_per_s") else f"{v * 1000:.3f} ms"
        rows.append([k, shown, notes.get(k, "")])
    return "\n".join([f"autosaved bench small: ~200-byte updates on {r['host']}",
                      table(rows, ["measure", "value", "ratio"]),
                      f"write-ahead log: {r['wal_records']} records in {r['wal_syncs']} fdatasyncs"])


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="autosaved-bench-") as tmp:
        result = measure(max(10, args.count), max(0.2, args.seconds), Path(tmp))
    result.update({k: round(v, 3) for k, v in ratios(result).items()})
    if args.json:
        print_json(result)
    else:
        print(render(result))
    return 0
