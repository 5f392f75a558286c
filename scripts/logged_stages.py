"""Where one small ``update()`` spends its time, stage by stage, from the client's call to its return (issue 21).

    python scripts/logged_stages.py [--count 3000] [--waits accepted,logged]

Runs a private daemon (of the tree this script imports) with a probe that stamps the moments a
request passes (``time.perf_counter``, CLOCK_MONOTONIC: the client's stamps and the daemon's are on one
clock), drives ``--count`` updates of ``autosaved bench small``'s ~200-byte delta at each level, and prints
the median of each stage beside the floors measured in the same run (a raw ZeroMQ round trip, and a 200-byte
``write`` + ``fdatasync``; and a plain-Python ROUTER that makes each message durable before it echoes it, on
its one thread and, the daemon's shape, from a second thread). The probe wraps functions; it adds a few
microseconds to each stage it marks.

Stages (daemon side; the log's only for ``logged``):
  to daemon       the client builds and sends the request; libzmq hands it over; the event loop wakes
  edge            the rpc server checks it at the edge and starts it (rpcserver._handle, _dispatch)
  settle          the bookkeeping of log batches synced since, run at the request's start
  decode          the delta decoded from the request (rpcupdate._parse_update)
  to merge        the handler up to the merge (policy, quota)
  merge           Job.apply
  record          the log record taken from the job and queued (take_log_record, enqueue)
  frame           the record encoded on the event loop (walcommit._prepare: WalWriter.frame)
  to log thread   the hop to the log thread (its wake-up, and the GIL)
  to fsync        in the log thread up to fdatasync (the write)
  fdatasync       the sync itself
  reply built     the reply packed in the log thread
  reply sent      the send on the shared socket (its lock, libzmq)
  to client       libzmq, the client's wake-up and its decode of the reply, up to update()'s return
An ``accepted`` update is answered on the event loop: its last daemon stage is ``merge``, then ``to client``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import autosaved
from autosaved import Client
from autosaved.bench.small import _DAEMON_CONFIG, fsync_s, rtt_s, small_delta, sync_echo_s
from autosaved.testing.private import PrivateDaemon

# Installed as sitecustomize in the daemon's process only (PYTHONPATH of its environment): wraps the
# functions a request passes through and writes the stamps out on SIGUSR2.
_PROBE = textwrap.dedent('''
    import json, os, signal, threading, time
    if os.environ.get("AUTOSAVED_STAGES"):
        from autosaved.daemon import jobs, rpcsocket, rpcupdate, walcommit
        from autosaved.storage import fileops
        stamps = []
        now = time.perf_counter

        def mark(name):
            stamps.append((name, now()))

        def around(owner, attr, name):
            inner = getattr(owner, attr)
            def wrapped(*args, **kwargs):
                mark(name + ">")
                try:
                    return inner(*args, **kwargs)
                finally:
                    mark(name + "<")
            setattr(owner, attr, wrapped)

        around(walcommit.SyncThreads, "settle", "settle")
        around(rpcupdate.UpdateOps, "_parse_update", "decode")
        around(rpcupdate.UpdateOps, "_apply_update", "handler")
        around(jobs.Job, "apply", "merge")
        around(walcommit.LogCommitter, "_prepare", "frame")
        around(rpcsocket.SharedSocket, "send_from_thread", "send")
        around(rpcsocket.SharedSocket, "send", "send")
        sync = fileops.fdatasync
        def fdatasync(fd):
            mark("fsync>"); sync(fd); mark("fsync<")
        fileops.fdatasync = fdatasync
        submit = walcommit.SyncThreads.submit
        def submitted(self, func, done, *args, **kwargs):
            mark("submit")
            def run():
                mark("thread")
                return func()
            return submit(self, run, done, *args, **kwargs)
        walcommit.SyncThreads.submit = submitted
        receiver_init = rpcsocket.Receiver.__init__
        def init(self, sock, handle, *args, **kwargs):
            def received(frames):
                mark("recv")
                return handle(frames)
            receiver_init(self, sock, received, *args, **kwargs)
        rpcsocket.Receiver.__init__ = init

        def dump(*_):
            with open(os.environ["AUTOSAVED_STAGES"], "w") as f:
                json.dump(stamps, f)
        signal.signal(signal.SIGUSR2, dump)
''')

STAGES = [  # (name, from stamp, to stamp)
    ("to daemon", "call", "recv"), ("edge", "recv", "settle>"), ("settle", "settle>", "settle<"),
    ("decode", "decode>", "decode<"), ("to merge", "decode<", "merge>"), ("merge", "merge>", "merge<"),
    ("record", "merge<", "frame>"), ("frame", "frame>", "frame<"), ("to log thread", "submit", "thread"),
    ("to fsync", "thread", "fsync>"), ("fdatasync", "fsync>", "fsync<"), ("reply built", "fsync<", "send>"),
    ("reply sent", "send>", "send<"), ("to client", "send<", "return"),
]
ACCEPTED_STAGES = [*STAGES[:6], ("reply built", "merge<", "send>"), *STAGES[-2:]]

def requests(stamps: list[tuple[str, float]], calls: list[tuple[float, float]]) -> list[dict[str, float]]:
    """The daemon's stamps cut into requests (each starts at a ``recv``), with the client's call and return."""
    out: list[dict[str, float]] = []
    for name, t in stamps:
        if name == "recv":
            out.append({"recv": t})
        elif out and name not in out[-1]:
            out[-1][name] = t
    matched = []
    calls_iter = iter(calls)
    call = next(calls_iter, None)
    for req in out:
        while call is not None and call[1] < req["recv"]:
            call = next(calls_iter, None)  # a call that returned before this request came was a warm-up
        if call is not None and call[0] <= req["recv"] <= call[1]:
            matched.append({**req, "call": call[0], "return": call[1]})
    return matched


def profile(address: str, pid: int, out: Path, wait: str, count: int, job: str) -> dict[str, float]:
    calls = []
    with Client(job, address=address) as client:
        for i in range(100):
            client.update(small_delta(i), wait=wait)
        for i in range(count):
            delta = small_delta(i)
            t = time.perf_counter()
            client.update(delta, wait=wait)
            calls.append((t, time.perf_counter()))
    os.kill(pid, 10 + 2)  # SIGUSR2: the probe writes its stamps
    deadline = time.monotonic() + 30
    while not out.exists() or not out.stat().st_size:
        if time.monotonic() > deadline:
            raise SystemExit("the daemon's probe wrote no stamps")
        time.sleep(0.05)
    time.sleep(0.2)
    stamps = json.loads(out.read_text())
    out.unlink()
    reqs = requests([(n, t) for n, t in stamps], calls)
    stages = STAGES if wait == "logged" else ACCEPTED_STAGES
    totals = [(r["return"] - r["call"]) * 1e6 for r in reqs]
    result = {"requests": float(len(reqs)), "total_us": statistics.median(totals)}
    for name, a, b in stages:
        spans = [(r[b] - r[a]) * 1e6 for r in reqs if a in r and b in r]
        if spans:
            result[name] = statistics.median(spans)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--waits", default="accepted,logged")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        probe_dir = Path(tmp) / "probe"
        probe_dir.mkdir()
        (probe_dir / "sitecustomize.py").write_text(_PROBE)
        stamps = Path(tmp) / "stamps.json"
        env = {"AUTOSAVED_STAGES": str(stamps),
               "PYTHONSAFEPATH": "1",  # the daemon runs the tree this script imports, not the working directory's
               "PYTHONPATH": os.pathsep.join([str(probe_dir), str(Path(autosaved.__file__).resolve().parent.parent),
                                              os.environ.get("PYTHONPATH", "")])}
        report: dict[str, object] = {"load": round(os.getloadavg()[0], 2)}
        with PrivateDaemon(config=_DAEMON_CONFIG, env=env) as daemon:
            assert daemon.proc is not None
            report["rtt_us"] = rtt_s(1000, daemon.sock_dir) * 1e6
            report["fsync_us"] = fsync_s(daemon.state_dir) * 1e6
            report["sync_echo_us"] = sync_echo_s(1000, daemon.sock_dir, daemon.state_dir, "inline") * 1e6
            report["sync_echo_thread_us"] = sync_echo_s(1000, daemon.sock_dir, daemon.state_dir, "thread") * 1e6
            for wait in args.waits.split(","):
                report[wait] = profile(daemon.address, daemon.proc.pid, stamps, wait, args.count, f"stages-{wait}")
            daemon.stop()
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"load {report['load']}; floors: zmq round trip {report['rtt_us']:.0f} us, write + fdatasync "
          f"{report['fsync_us']:.0f} us; an echo that syncs before it replies {report['sync_echo_us']:.0f} us, "
          f"with the sync and reply in a second thread {report['sync_echo_thread_us']:.0f} us")
    for wait in args.waits.split(","):
        stages = report[wait]
        assert isinstance(stages, dict)
        print(f"\n{wait}: median {stages.pop('total_us'):.0f} us per update ({stages.pop('requests'):.0f} requests)")
        for name, us in stages.items():
            print(f"  {name:<14} {us:7.0f} us")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
