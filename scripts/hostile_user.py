#!/usr/bin/env python3
"""A hostile local user beside a well-behaved one, as real non-root users (issue 19; needs root to
``useradd`` them): the daemon's exits, RSS and fds and the well-behaved client's latency are measured.

    python scripts/hostile_user.py --seconds 600            # the 10-minute run
    python scripts/hostile_user.py --seconds 30 --json      # what tests/test_bounds.py runs

The hostile user, at once: many idle connections on both sockets; restores never read (inline and as
memfds); half-sent messages (frames with the more-flag and no last frame, and a raw ZMTP frame announced
big and never finished); expensive state shapes (many tiny maps, big ints, empty containers); deletes of
random names. The well-behaved user sends small ``accepted`` updates at a steady pace, first alone, then
beside the attack. Asserted (exit status 1 otherwise): the daemon never exits, its RSS stays within the
budget the config implies, and the well-behaved p99 under attack is at most ``--p99-factor`` times its
p99 alone.

CPU: on 2 cores the attack's five busy processes, the daemon and the well-behaved client share the CPU.
``--cpu-layout`` says how (cgroups, see ``LAYOUTS``): ``service`` (the default) is what the unit file gives
on any systemd host, the daemon in a group of its own and both users in another; ``per-user`` adds
systemd's per-user slices; ``flat`` puts everything in one group. The well-behaved client reports its
p99 also net of the time it waited for a core itself (``net_p99_ms``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

MiB = 1024**2
# The daemon's config for the run: every per-user bound set, so the RSS budget below is what it implies.
MAX_MESSAGE = 32 * MiB
MAX_CONNECTIONS = 32
MAX_REPLY = 128 * MiB
MAX_BYTES = 64 * MiB
MAX_SHM = 256 * MiB


def config(group: str, cpu_share: str = "0.5") -> str:
    return (f'write_speed = "200MiB"\nsocket_group = "{group}"\nmax_message_bytes = {MAX_MESSAGE}\n'
            '[policy]\nidle = "2s"\ninterval = "off"\nmin_gap = "1s"\n'
            f'[quota]\nmax_connections = {MAX_CONNECTIONS}\nmax_reply_bytes = {MAX_REPLY}\n'
            f'max_bytes = {MAX_BYTES}\nmax_shm_bytes = {MAX_SHM}\nmax_jobs = 20\n'
            f'cpu_share = {cpu_share if cpu_share == "off" else float(cpu_share)!r}\n')


def rss_budget(baseline: int) -> int:
    """What one hostile user may make the daemon hold on top of its baseline: unread replies and restore
    buffers, a partial message on each of its connections, its held state (at up to 8x its counted size
    in Python objects) and its slots, plus 256 MiB for allocator slack."""
    return baseline + MAX_REPLY + MAX_CONNECTIONS * MAX_MESSAGE + 8 * MAX_BYTES + MAX_SHM + 256 * MiB


# -- the hostile user's roles (run as that user: this file with --role) -------------------------------------


def zmtp_half_frame(path: str, announced: int, sent: int) -> socket.socket:
    """A raw ZMTP 3.0 DEALER that announces a frame of ``announced`` bytes and sends ``sent`` of them."""
    from autosaved.testing import zmtp

    s = zmtp.dealer(path)
    s.sendall(zmtp.frame_header(announced))  # a long frame, no more-flag: one whole message
    s.sendall(b"\x00" * sent)
    return s


def role(name: str, address: str, seconds: float) -> None:
    import msgpack
    import numpy as np
    import zmq

    import autosaved
    from autosaved.protocol import pack_header

    path = address.removeprefix("ipc://")
    deadline = time.monotonic() + seconds
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 100_000)
    keep: list[Any] = []
    if name == "connections":
        while time.monotonic() < deadline:
            for _ in range(500):  # idle DEALERs; the refused ones reconnect every 100 ms (libzmq's default)
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(address)
                keep.append(s)
            for _ in range(50):
                c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                c.setblocking(False)
                with contextlib.suppress(OSError):
                    c.connect(path + ".fd")
                keep.append(c)
            if len(keep) > 4000:  # the user's own fds: start over (the daemon sees a churn of connects)
                for k in keep:
                    k.close()
                keep.clear()
            time.sleep(2)
    elif name == "unread":
        with autosaved.Client("fat", address=address) as c:
            c.update({"w": np.ones(4 * MiB // 8)}, wait="committed")
        fd = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd.connect(path + ".fd")
        token = msgpack.unpackb(fd.recv(4096))["token"]  # then never read again: memfds pile up unread
        lazy = ctx.socket(zmq.DEALER)
        lazy.setsockopt(zmq.RCVHWM, 1)
        lazy.setsockopt(zmq.SNDHWM, 0)
        lazy.connect(address)
        seq = 0
        while time.monotonic() < deadline:
            seq += 1
            lazy.send_multipart([pack_header({"v": 1, "op": "restore", "seq": seq, "job": "fat",
                                              **({"shm_conn": token} if seq % 2 else {})})])
            time.sleep(0.005)
    elif name == "halfsent":
        while time.monotonic() < deadline:
            for _ in range(4):
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(address)
                s.send(pack_header({"v": 1, "op": "ping", "seq": 1}), zmq.SNDMORE)
                s.send(b"\x00" * (8 * MiB), zmq.SNDMORE)  # and never the last frame
                keep.append(s)
            for _ in range(4):
                with contextlib.suppress(OSError):
                    keep.append(zmtp_half_frame(path, MAX_MESSAGE - 1024, MAX_MESSAGE // 2))
            time.sleep(3)
            if len(keep) > 40:
                for k in keep:
                    k.close()
                keep.clear()
    elif name == "shapes":
        rng = random.Random(1)
        i = 0
        while time.monotonic() < deadline:
            i += 1
            job = f"shape{i % 8}"
            try:
                with autosaved.Client(job, address=address, timeout=30) as c:
                    kind = i % 3
                    if kind == 0:
                        c.update({f"m{i}": {str(j): {"a": j} for j in range(20_000)}})
                    elif kind == 1:
                        c.update({f"big{i}": [10**4000 + j for j in range(50)]})
                        c.update({f"n{i}": [rng.getrandbits(62) for _ in range(10_000)]})
                    else:
                        c.update({f"e{i}": {str(j): {} for j in range(20_000)}, f"l{i}": [[] for _ in range(5000)]})
            except Exception:  # quota errors are what this role runs into; carry on
                pass
    elif name == "deletes":
        sock = ctx.socket(zmq.DEALER)
        sock.connect(address)
        seq = 0
        while time.monotonic() < deadline:
            for _ in range(100):
                seq += 1
                sock.send_multipart([pack_header({"v": 1, "op": "delete", "seq": seq,
                                                  "job": f"nope{random.getrandbits(40)}"})])
            while sock.poll(0):
                sock.recv_multipart()
            time.sleep(0.01)
    for k in keep:
        k.close()
    ctx.destroy(0)


# -- the well-behaved user ---------------------------------------------------------------------------------


def _runqueue_wait_s() -> float:
    """How long this thread has waited for a core so far (the kernel's schedstat), 0 where unreadable."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def steady(address: str, seconds: float, rate: float) -> dict[str, float]:
    """Small ``accepted`` updates at ``rate`` per second; the latency of each as the client sees it, and
    the same less the time this client itself waited for a core meanwhile (``net``: what the daemon and
    the transport took, whoever kept this process off the CPU)."""
    import numpy as np

    import autosaved

    lat: list[float] = []
    net: list[float] = []
    errors = 0
    with autosaved.Client("steady", address=address, timeout=30) as c:
        c.update({"w": np.zeros(512), "step": 0})
        deadline = time.monotonic() + seconds
        step = 0
        while time.monotonic() < deadline:
            step += 1
            waited = _runqueue_wait_s()
            t = time.perf_counter()
            try:
                c.update({"step": step, "w": np.full(512, step, dtype=np.float64)}, wait="accepted")
                took = time.perf_counter() - t
                lat.append(took)
                net.append(took - (_runqueue_wait_s() - waited))
            except Exception:
                errors += 1
            time.sleep(max(0.0, 1 / rate - (time.perf_counter() - t)))
        restored = c.restore()["step"]
    lat.sort()
    net.sort()
    return {"n": len(lat), "errors": errors, "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], "max_ms": 1000 * lat[-1],
            "net_p99_ms": 1000 * net[min(len(net) - 1, int(len(net) * 0.99))],
            "restored_step_ok": float(restored == step)}


# -- the run ---------------------------------------------------------------------------------------------


ROLES = ("connections", "unread", "halfsent", "shapes", "deletes")
# The CPU layouts a run can measure: which group of equal CPU weight the daemon, the well-behaved user and
# the hostile user run in. "service" is what the unit file gives on any systemd host (its CPUWeight= turns
# the cpu controller on: the service's slice and user.slice share the cores by weight, users' processes
# share user.slice's part among themselves); "per-user" adds systemd's per-user slices with weights, as a
# shared host's admin sets them; "flat" is one group, where the kernel shares the cores between every
# runnable thread, whoever's.
LAYOUTS: dict[str, dict[str, str]] = {
    "service": {"daemon": "service", "good": "users", "hostile": "users"},
    "per-user": {"daemon": "service", "good": "user-good", "hostile": "user-hostile"},
    "flat": {},
}


def run(seconds: float, alone_s: float, rate: float, p99_factor: float, roles: tuple[str, ...] = ROLES,
        profile: str | None = None, layout: str = "service", run_weight: int | None = None,
        cpu_share: str = "0.5") -> dict[str, Any]:
    import psutil

    from autosaved.client.admin import Admin
    from autosaved.testing import slices as cgroups
    from autosaved.testing.private import PrivateDaemon
    from autosaved.testing.realusers import missing, real_users

    why = missing()
    if why is not None:
        raise SystemExit(why)
    me = [sys.executable, os.path.abspath(__file__)]
    root = Path(tempfile.mkdtemp(prefix="autosaved-hostile-"))
    os.chmod(root, 0o755)
    if layout != "flat" and (no_slices := cgroups.missing()) is not None:
        raise SystemExit(f"--cpu-layout {layout}: {no_slices} (--cpu-layout flat runs without CPU groups)")
    # Which CPU group each party runs in (see autosaved/testing/slices.py).
    group_of = LAYOUTS[layout]
    with real_users(2) as (users, group), contextlib.ExitStack() as stack:
        hostile, good = users
        groups = (stack.enter_context(cgroups.cpu_slices(tuple(sorted(set(group_of.values()))), run_weight))
                  if group_of else {})

        def into(party: str) -> Any:
            return groups[group_of[party]].preexec() if groups else None

        d = PrivateDaemon(root / "d", config=config(group, cpu_share))
        d.start()
        assert d.proc is not None
        if groups:
            groups[group_of["daemon"]].join(d.proc.pid)
        proc = psutil.Process(d.proc.pid)
        samples: list[tuple[int, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                try:
                    samples.append((proc.memory_info().rss, proc.num_fds()))
                except psutil.Error:
                    return
                stop.wait(0.25)

        def as_good(secs: float) -> dict[str, float]:
            out = subprocess.run(good.command([*me, "--steady", d.address, str(secs), str(rate)]),
                                 capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"},
                                 timeout=secs + 120, preexec_fn=into("good"))
            if out.returncode != 0:
                raise RuntimeError(f"the well-behaved client failed: {out.stderr[-2000:]}")
            result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
            return result

        try:
            alone = as_good(alone_s)
            baseline_rss = proc.memory_info().rss
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            attackers = [subprocess.Popen(hostile.command([*me, "--role", r, d.address, str(seconds)]),
                                          env={**os.environ, "HOME": "/tmp"}, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, preexec_fn=into("hostile")) for r in roles]
            # The daemon's stacks under attack (py-spy's collapsed format, sampled without pausing it).
            spy_bin = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            spy = None if profile is None else subprocess.Popen(
                [spy_bin, "record", "--nonblocking", "--format", "raw", "--rate", "200", "--threads",
                 "--output", profile, "--pid", str(d.proc.pid), "--duration", str(int(seconds))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            under = as_good(seconds)
            if spy is not None:
                spy.wait(120)
            for a in attackers:
                try:
                    a.wait(60)
                except subprocess.TimeoutExpired:
                    a.kill()
                    a.wait()
            stop.set()
            sampler.join()
            with Admin(address=d.address, timeout=60) as admin:
                edge = admin.status()["daemon"]["edge"]
            exited = d.proc.poll()
            stop_code = d.stop()
            # Why a stop failed, in the report itself: the daemon's directory is gone after the run.
            stop_log = "" if stop_code == 0 else d.log()[-4000:]
        finally:
            stop.set()
            d.cleanup()
            shutil.rmtree(root, ignore_errors=True)
    budget = rss_budget(baseline_rss)
    rss_max = max((r for r, _ in samples), default=0)
    report = {
        "seconds": seconds, "roles": list(roles), "cpu_layout": layout, "run_weight": run_weight,
        "cpu_share": cpu_share,
        "alone": alone, "under_attack": under,
        "p99_ratio": under["p99_ms"] / max(alone["p99_ms"], 1e-9),
        "net_p99_ratio": under["net_p99_ms"] / max(alone["net_p99_ms"], 1e-9),
        "daemon_exits": 0 if exited is None else 1, "stop_exit_code": stop_code,
        "stop_log_tail": stop_log,
        "rss_baseline_mib": baseline_rss / MiB, "rss_max_mib": rss_max / MiB, "rss_budget_mib": budget / MiB,
        "fds_max": max((f for _, f in samples), default=0), "edge": edge, "load": os.getloadavg(),
    }
    report["ok"] = (report["daemon_exits"] == 0 and stop_code == 0 and rss_max <= budget
                    and report["p99_ratio"] <= p99_factor and under["errors"] == 0
                    and under["restored_step_ok"] == 1.0)
    return report


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--role":
        role(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--steady":
        print(json.dumps(steady(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0, help="how long the attack lasts")
    ap.add_argument("--alone", type=float, default=None, help="the well-behaved baseline (default: seconds/4, "
                                                               "at most 60)")
    ap.add_argument("--rate", type=float, default=50.0, help="the well-behaved client's updates per second")
    ap.add_argument("--p99-factor", type=float, default=3.0)
    ap.add_argument("--roles", default=",".join(ROLES),
                    help=f"the hostile roles to run, comma-separated (default: all of {','.join(ROLES)})")
    ap.add_argument("--profile", metavar="FILE", help="py-spy the daemon during the attack into FILE "
                                                       "(collapsed stacks; needs py-spy)")
    ap.add_argument("--cpu-layout", choices=tuple(LAYOUTS), default="service",
                    help="CPU groups of equal weight (cgroups, root): 'service' puts the daemon in one and both "
                         "users in another, as the unit file does on any systemd host; 'per-user' gives each "
                         "user a group of their own too; 'flat' runs all in one (default: service)")
    ap.add_argument("--run-weight", type=int, default=None, metavar="W",
                    help="the CPU weight of this run's groups together against the host's other work (cgroup v2 "
                         "units, default 100 like any other group): on a shared host a larger one (say 10000) "
                         "keeps other people's processes from blurring the measurement")
    ap.add_argument("--cpu-share", default="0.5", help="the daemon's quota.cpu_share (cores, or off)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    roles = tuple(r for r in args.roles.split(",") if r)
    if not roles or any(r not in ROLES for r in roles):
        ap.error(f"--roles: choose from {','.join(ROLES)}")
    alone = args.alone if args.alone is not None else min(60.0, max(5.0, args.seconds / 4))
    report = run(args.seconds, alone, args.rate, args.p99_factor, roles, args.profile, args.cpu_layout,
                 args.run_weight, args.cpu_share)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
