"""Every connection, reply and restore buffer a user causes is bounded and charged to that user (issue 19,
defects 1 and 3), and a hostile user beside a well-behaved one (scripts/hostile_user.py, short).

Real users (useradd) against a real daemon whose fd limit is set low with ``prlimit`` before it starts:
one user opens far more idle connections than the daemon has fds, on the ZeroMQ socket and on the fd
socket; the daemon stays up, keeps another user's accepted update and serves that user, and the user
over the cap is refused with a ``quota.max_connections`` reason.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import pytest
import zmq

import autosaved
from autosaved.client.admin import Admin
from autosaved.daemon.connguard import ACL_XATTR, CUT_DENY_S, ConnGuard, acl_denying, refusal
from autosaved.daemon.cpushare import CONTENDED_S
from autosaved.daemon.fdlimit import listener_cap
from autosaved.protocol import pack_header, unpack_header
from autosaved.testing import zmtp
from autosaved.testing.private import PrivateDaemon
from autosaved.testing.realusers import User, missing

from .conftest import NO_AUTO_POLICY, TEST_WRITE_SPEED, skip_or_fail, wait_for

pytestmark = pytest.mark.xdist_group("realusers")


def as_user(user: User, code: str, *args: str) -> dict[str, object]:
    """Run ``code`` as ``user`` with ``args``; it prints one JSON value last."""
    proc = user.python(textwrap.dedent(code), *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"{out.decode()}\n{err.decode()}"
    result: dict[str, object] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# Opens N idle DEALERs and N/4 fd-socket connections, reads nothing on the DEALERs, and holds them all
# until its stdin closes. Prints how the fd socket answered (token, quota refusal, or no answer).
HOG = """
import json, resource, socket, sys, msgpack, zmq
address, fd_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = zmq.Context()
ctx.set(zmq.MAX_SOCKETS, n + 16)
dealers = []
for _ in range(n):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    dealers.append(s)
answers = {"token": 0, "quota": 0, "none": 0}
conns = []
for _ in range(n // 4):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.settimeout(0.5)
    try:
        c.connect(fd_path)
        hello = msgpack.unpackb(c.recv(4096))
        answers["token" if "token" in hello else str(hello.get("code"))] += 1
    except OSError:
        answers["none"] += 1
    conns.append(c)
print(json.dumps(answers), flush=True)
sys.stdin.read()
"""

PROBE = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print(json.dumps({"errno": 0}))
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
"""

# argv: address, job, expected k (or -1: no such job yet), new k. Prints what it restored.
CLIENT = """
import json, sys, autosaved
address, job, expect, new = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with autosaved.Client(job, address=address, timeout=30) as c:
    got = c.restore()["k"] if expect >= 0 else -1
    c.update({"k": new}, wait="accepted")
print(json.dumps({"restored": got}))
"""


def test_idle_connections_never_abort_the_daemon_nor_lock_other_users_out(
        users: tuple[list[User], str], tmp_path: Path) -> None:
    (hog_user, good_user), group = users
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + f'socket_group = "{group}"\n' + NO_AUTO_POLICY
                      + "[quota]\nmax_connections = 8\n", log_level="debug",
                      command_prefix=["prlimit", "--nofile=1024:1024"])  # soft and hard, from exec on
    hog: subprocess.Popen[bytes] | None = None
    try:
        d.start()
        assert d.proc is not None
        fd_path = d.address.removeprefix("ipc://") + ".fd"
        # The well-behaved user's update, accepted only (in daemon memory): an abort would lose it.
        assert as_user(good_user, CLIENT, d.address, "victim", "-1", "1") == {"restored": -1}
        hog = hog_user.python(textwrap.dedent(HOG), d.address, fd_path, "1500", stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
        assert hog.stdout is not None
        answers = json.loads(hog.stdout.readline())
        # The fd socket: the hog's first 8 connections are served, the rest refused with a quota reply.
        assert answers["token"] == 8 and answers["quota"] >= 1, answers
        wait_for(lambda: f"quota.max_connections: uid {hog_user.uid} has 8 connections open on the ipc socket"
                 in d.log() or d.proc.poll() is not None, timeout=60)  # type: ignore[union-attr]
        assert d.proc.poll() is None, d.log()[-3000:]
        # The socket file is now closed to the hog's user alone (an ACL): its reconnects cost the daemon nothing.
        assert as_user(hog_user, PROBE, d.address.removeprefix("ipc://")) == {"errno": errno.EACCES}
        # Another user is not locked out: a new connection, its accepted state intact, a new update.
        assert as_user(good_user, CLIENT, d.address, "victim", "1", "2") == {"restored": 1}
        assert d.proc.poll() is None, d.log()[-3000:]
        hog.stdin.close()  # type: ignore[union-attr]
        hog.wait(60)
        # Once the hog's connections are gone, its user is served again.
        assert as_user(hog_user, CLIENT, d.address, "mine", "-1", "5") == {"restored": -1}
        assert as_user(good_user, CLIENT, d.address, "victim", "2", "3") == {"restored": 2}
        assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
    finally:
        if hog is not None and hog.poll() is None:
            hog.kill()
            hog.wait()
        d.cleanup()


# argv: address, cap. Holds ``cap`` connected clients, then asks as one more (a blocking client, then an async
# one) and prints what each got; then closes one held client and is served again.
OVER_THE_CAP = """
import json, sys, time, anyio, autosaved
address, cap = sys.argv[1], int(sys.argv[2])
held = [autosaved.Client(f"held{i}", address=address, timeout=60) for i in range(cap)]
for c in held:
    c.connect()
out = {"module": autosaved.__file__}

def outcome(name, call):
    try:
        call()
        out[name] = "answered"
    except autosaved.AutosavedError as exc:
        out[name] = type(exc).__name__
        out[name + "_message"] = str(exc)

# The guard refuses from its own thread, after libzmq accepted the connection: the first requests on it
# may be served before that (the fd headroom absorbs them), so each client asks until refused, for 30 s.
def until_refused(call):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        call()

over = autosaved.Client("over", address=address, timeout=3)
outcome("sync", lambda: until_refused(lambda: over.update({"k": 1})))

async def aupdate():
    async with autosaved.AsyncClient("over", address=address, timeout=3, save_timeout=3) as c:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            await c.update({"k": 2})

outcome("async", lambda: anyio.run(aupdate))
held.pop().close()
over.close()
over = autosaved.Client("over", address=address, timeout=60)
outcome("after", lambda: over.update({"k": 3}))
print(json.dumps(out))
"""


def test_a_refused_connection_names_the_bound(users: tuple[list[User], str], tmp_path: Path) -> None:
    """A user at ``quota.max_connections`` asks on one more connection: the guard shuts it down and closes
    the socket file to the user, and the request then in it is lost (those before the guard's thread acted
    may have been served: on a busy host one was). The client's error names the bound (``QuotaExceeded``,
    not a bare timeout), blocking and async; once one of the user's connections closes it is served."""
    (user, _other), group = users
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + f'socket_group = "{group}"\n' + NO_AUTO_POLICY
                      + "[quota]\nmax_connections = 2\n")
    try:
        d.start()
        got = as_user(user, OVER_THE_CAP, d.address, "2")
        assert str(got["module"]).startswith(str(Path(autosaved.__file__).parent)), got
        for name in ("sync", "async"):
            assert got[name] == "QuotaExceeded", (got, d.log()[-4000:])
            assert "quota.max_connections" in str(got[f"{name}_message"]), got
        assert got["after"] == "answered", got
        assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
    finally:
        d.cleanup()


def test_connections_past_the_global_cap_are_refused_not_fatal(tmp_path: Path, figure: Callable[[str], None]) -> None:
    """One user (root here, which the socket's mode does not stop) at the global cap: refused, no abort; once
    its connections are gone, its next connection is served and the guard counts none of them."""
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + NO_AUTO_POLICY + "[quota]\nmax_connections = 5000\n",
                      command_prefix=["prlimit", "--nofile=1024:1024"])
    flood = zmq.Context()
    flood.set(zmq.MAX_SOCKETS, 4000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    try:
        d.start()
        assert d.proc is not None
        with autosaved.Client("kept", address=d.address) as c:
            c.update({"k": 1}, wait="accepted")
        dealers = []
        for _ in range(1300):
            s = flood.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.address)
            dealers.append(s)
        wait_for(lambda: "connections are open on the ipc socket (the limit is 170)" in d.log()
                 or d.proc.poll() is not None, timeout=60)  # type: ignore[union-attr]
        assert d.proc.poll() is None, d.log()[-3000:]
        # Root's connections are not stopped by the socket's mode: while they keep reconnecting, any new one
        # at the global cap is refused, and a request already written into it is lost (the client waits
        # out its timeout). So the flood must be gone, not just closed: libzmq closes a socket's fd in its
        # own thread later (0.4-1.5 s for 2,500 of them); terminating the context waits for that.
        for s in dealers:
            s.close(0)
        flood.destroy(0)
        with Admin(address=d.address, timeout=60) as admin:
            edge = admin.status()["daemon"]["edge"]
            # The count comes back to this one connection: none of the flood's is still counted.
            wait_for(lambda: (ipc := admin.status()["daemon"]["edge"]["ipc"])["open"] == 1 and not ipc["closed"],
                     timeout=60)
        figure(f"1300 connections against an fd limit of 1024: at most {edge['ipc']['peak']} open at once "
               f"(cap {edge['connection_cap']}), {edge['ipc']['refused']} refused")
        assert edge["ipc"]["peak"] < 1024 - 64, edge
        with autosaved.Client("kept", address=d.address, timeout=60) as c:
            assert c.restore() == {"k": 1}
        assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
    finally:
        flood.destroy(0)
        d.cleanup()


def test_the_guard_refuses_by_the_live_count_not_by_queued_events(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The guard's events are history: a new connection's ACCEPTED can be read before the DISCONNECTED of
    connections already gone. A refusal by that count would refuse (and lose the request of) a connection
    while the live ones are under the cap: the guard recounts the live connections before it refuses any."""
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    kept: list[socket.socket] = [listener]  # the accepted ends stay open, as libzmq holds them until it reads EOF

    def connect() -> tuple[socket.socket, int]:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(path)
        served, _ = listener.accept()
        kept.extend([client, served])
        return client, served.fileno()

    def shut(client: socket.socket) -> bool:
        client.setblocking(False)
        try:
            return client.recv(1) == b""
        except BlockingIOError:
            return False

    guard = ConnGuard(path, total_cap=2, per_user=lambda: 100)  # fed by hand: no monitor thread
    try:
        c1, a1 = connect()
        c2, a2 = connect()
        guard.handle([(zmq.EVENT_ACCEPTED, a1), (zmq.EVENT_ACCEPTED, a2)])
        assert (guard.total, guard.refused) == (2, 0)
        c1.close()
        c2.close()
        c3, a3 = connect()
        guard.handle([(zmq.EVENT_ACCEPTED, a3)])  # their DISCONNECTED events are still queued
        assert (guard.total, guard.refused, guard.reconciled) == (1, 0, 2)
        assert not shut(c3)
        guard.handle([(zmq.EVENT_DISCONNECTED, a1), (zmq.EVENT_DISCONNECTED, a2)])  # late: nothing taken off twice
        assert guard.total == 1
        # Over the cap by live connections: the newest ones are refused (shut down), the older ones kept, and
        # the one warning names the count the refusals left (the cap), not the batch's peak.
        c4, a4 = connect()
        c5, a5 = connect()
        c6, a6 = connect()
        with caplog.at_level(logging.WARNING, logger="autosaved.daemon"):
            guard.handle([(zmq.EVENT_ACCEPTED, a4), (zmq.EVENT_ACCEPTED, a5), (zmq.EVENT_ACCEPTED, a6)])
        assert (guard.total, guard.refused) == (2, 2)
        assert shut(c6) and shut(c5) and not shut(c4) and not shut(c3)
        refusals = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
        assert len(refusals) == 1 and "2 connections are open on the ipc socket (the limit is 2)" in refusals[0]
        guard.handle([(zmq.EVENT_DISCONNECTED, a5), (zmq.EVENT_DISCONNECTED, a6)])
        assert guard.total == 2
    finally:
        guard.stop()
        for s in kept:
            s.close()


def test_a_cut_connection_is_shut_down_and_its_user_kept_off_the_socket_for_a_while(tmp_path: Path) -> None:
    """A connection flooding past its user's refusal budget is cut (rpcserver): shut down, taken off the
    count, and the socket file closed to that user alone (an ACL) for :data:`CUT_DENY_S`, then opened again.
    Only a counted connection of the user named is cut."""
    path = str(tmp_path / "s.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    served, _ = listener.accept()
    uid = os.getuid()
    guard = ConnGuard(path, total_cap=10, per_user=lambda: 10)  # fed by hand: no monitor thread
    try:
        guard.handle([(zmq.EVENT_ACCEPTED, served.fileno())])
        assert not guard.cut(served.fileno(), uid + 1)  # not that user's connection
        assert not guard.cut(served.fileno() + 100, uid)  # not a counted connection
        assert (guard.total, guard.cut_count) == (1, 0)
        assert guard.cut(served.fileno(), uid)
        assert (guard.total, guard.cut_count) == (0, 1)
        client.settimeout(10)
        assert client.recv(1) == b""  # shut down: the peer reads the end
        try:
            acl = os.getxattr(path, ACL_XATTR)
        except OSError as exc:
            skip_or_fail(f"no POSIX ACLs on {tmp_path}: {exc}")
        assert acl == acl_denying(os.stat(path).st_mode, [uid])
        now = time.monotonic()
        guard.expire_cuts(now)  # not yet
        assert os.getxattr(path, ACL_XATTR) == acl
        guard.expire_cuts(now + CUT_DENY_S + 0.01)
        with pytest.raises(OSError):
            os.getxattr(path, ACL_XATTR)  # open to the user again
    finally:
        guard.stop()
        for s in (client, served, listener):
            s.close()


# Floods the daemon with deletes on one DEALER (reading nothing) until stdin closes.
FLOOD = """
import sys, time, zmq
from autosaved.protocol import pack_header
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(sys.argv[1])
seq = 0
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    for _ in range(500):
        seq += 1
        try:
            sock.send(pack_header({"v": 1, "op": "delete", "seq": seq, "job": f"nope{seq}"}), zmq.NOBLOCK)
        except zmq.Again:
            break
    time.sleep(0.01)
print("{}", flush=True)
"""


def test_a_flood_past_the_refusal_budget_is_cut_and_other_users_served(
        users: tuple[list[User], str], tmp_path: Path) -> None:
    """A user floods deletes far past ``quota.max_requests`` on one connection and reads nothing. Past its
    second's budget of answered refusals, that connection is cut and the socket file closed to the user for
    a moment: its next requests wait in its own process instead of each being received and dropped on the
    daemon's event loop. Another user is served throughout, and the flooder is served again afterwards."""
    (flooder, good_user), group = users
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + f'socket_group = "{group}"\n' + NO_AUTO_POLICY
                      + "[quota]\nmax_requests = 4\n")
    flood: subprocess.Popen[bytes] | None = None
    try:
        d.start()
        assert d.proc is not None
        flood = flooder.python(textwrap.dedent(FLOOD), d.address, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        wait_for(lambda: f"cut a connection of uid {flooder.uid}" in d.log() or d.proc.poll() is not None,  # type: ignore[union-attr]
                 timeout=60)
        assert d.proc.poll() is None, d.log()[-3000:]
        assert as_user(good_user, CLIENT, d.address, "victim", "-1", "1") == {"restored": -1}
        with Admin(address=d.address, timeout=60) as admin:
            edge = admin.status()["daemon"]["edge"]
        assert edge["ipc"]["cut_for_flooding"] >= 1 and edge["requests_unanswered"] >= 1, edge
        flood.kill()
        flood.wait(60)
        # The file opens to the flooder again (the ACL goes after CUT_DENY_S), and it is served.
        wait_for(lambda: as_user(flooder, PROBE, d.address.removeprefix("ipc://")) == {"errno": 0}, timeout=60)
        assert as_user(flooder, CLIENT, d.address, "mine", "-1", "5") == {"restored": -1}
        assert as_user(good_user, CLIENT, d.address, "victim", "1", "2") == {"restored": 1}
        assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        d.cleanup()


# argv: address, n. n updates of 20,000 tiny maps (a ~300 KB header each: decoded off the event loop).
BIG_UPDATES = """
import json, sys, autosaved
address, n = sys.argv[1], int(sys.argv[2])
with autosaved.Client("big", address=address, timeout=120) as c:
    for i in range(n):
        c.update({f"m{i}": {str(j): {"a": j} for j in range(20_000)}}, wait="accepted")
    got = sorted(k for k in c.restore() if k.startswith("m"))
print(json.dumps({"keys": got}))
"""

# Small updates until stdin closes; prints one line after the first.
STEADY = """
import sys, threading, time, autosaved
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
with autosaved.Client("steady", address=sys.argv[1], timeout=120) as c:
    c.update({"k": 0}, wait="accepted")
    print("{}", flush=True)
    step = 0
    while not done.is_set():
        step += 1
        c.update({"k": step}, wait="accepted")
        time.sleep(0.02)
"""


def _decode_throttled_s(address: str) -> float:
    with Admin(address=address, timeout=60) as admin:
        return float(admin.status()["daemon"]["edge"]["decode_cpu"]["throttled_s"])


def test_a_users_decodes_wait_for_its_cpu_share_only_while_another_user_is_served(
        users: tuple[list[User], str], tmp_path: Path) -> None:
    """``quota.cpu_share``: a user's big updates decode at full speed while it is alone on the daemon; while
    another user is being served, their decoding waits once past the user's share of CPU (counted in
    ``status`` ``daemon.edge.decode_cpu``), and every update is still applied."""
    (heavy, good_user), group = users
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + f'socket_group = "{group}"\n' + NO_AUTO_POLICY
                      + "[quota]\ncpu_share = 0.1\n")
    steady: subprocess.Popen[bytes] | None = None
    try:
        d.start()
        keys = [f"m{i}" for i in range(4)]
        time.sleep(CONTENDED_S + 0.5)  # the start's readiness ping (root, another user) is out of the window
        assert as_user(heavy, BIG_UPDATES, d.address, "4") == {"keys": keys}
        assert _decode_throttled_s(d.address) == 0.0  # alone: never slowed
        steady = good_user.python(textwrap.dedent(STEADY), d.address, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)
        assert steady.stdout is not None and steady.stdout.readline().strip() == b"{}"
        # Past the 0.1 CPU-s burst: a few rounds on a host fast enough to decode four updates within it.
        for _ in range(10):
            assert as_user(heavy, BIG_UPDATES, d.address, "4") == {"keys": keys}
            if _decode_throttled_s(d.address) > 0.0:
                break
        assert _decode_throttled_s(d.address) > 0.0
        steady.stdin.close()  # type: ignore[union-attr]
        assert steady.wait(60) == 0
        assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
    finally:
        if steady is not None and steady.poll() is None:
            steady.kill()
            steady.wait()
        d.cleanup()


def test_listener_cap_leaves_half_the_fds() -> None:
    assert listener_cap(1024, 524288) == 1024
    assert listener_cap(1024, 256) == 42  # 3 listeners at their caps use at most half of 256
    assert listener_cap(1024, 3) == 1


def test_refusal_names_the_bound_that_was_hit() -> None:
    assert refusal(1000, 8, 20, per_user=8, total_cap=42) is None
    assert "quota.max_connections: uid 1000 has 8" in (refusal(1000, 9, 20, per_user=8, total_cap=42) or "")
    assert "max_connections: 42 connections" in (refusal(1000, 1, 43, per_user=8, total_cap=42) or "")
    assert refusal(None, 500, 20, per_user=8, total_cap=42) is None  # tcp: no uid, only the global cap


# -- defect 3: replies and restore buffers a user never reads --------------------------------------------


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def test_replies_and_restore_buffers_left_unread_are_bounded_per_user(
        make_daemon: Callable[..., PrivateDaemon], figure: Callable[[str], None]) -> None:
    d = make_daemon(NO_AUTO_POLICY + '[quota]\nmax_reply_bytes = "32MiB"\n')
    assert d.proc is not None
    with autosaved.Client("big", address=d.address) as c:
        c.update({"w": np.random.default_rng(0).random(1024**2)}, wait="committed")
    assert d.stop(signal.SIGTERM) == 0
    d.start()  # every restore now reads the version from disk into new buffers
    assert d.proc is not None
    before = _rss(d.proc.pid)
    ctx = zmq.Context()
    lazy = ctx.socket(zmq.DEALER)
    lazy.setsockopt(zmq.LINGER, 0)
    lazy.setsockopt(zmq.RCVHWM, 1)  # read nothing, hold little: the daemon's queue is what is measured
    lazy.connect(d.address)
    fd_conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # 20 restores through the fd socket whose memfds are never received: 4 fit the budget.
        fd_conn.connect(d.address.removeprefix("ipc://") + ".fd")
        token = msgpack.unpackb(fd_conn.recv(4096))["token"]
        answers: list[dict[str, Any]] = []
        other = ctx.socket(zmq.DEALER)
        other.connect(d.address)
        for seq in range(1, 21):
            other.send_multipart([pack_header({"v": 1, "op": "restore", "seq": seq, "job": "big",
                                               "shm_conn": token})])
            assert other.poll(60_000)
            answers.append(unpack_header(other.recv_multipart()[0]))
        other.close(0)
        fd_conn.close()  # the unread memfds go with the connection: the budget is free again
        # 60 inline restores of an 8 MiB version, none read (the old daemon queued them all: ~480 MiB).
        for seq in range(1, 61):
            lazy.send_multipart([pack_header({"v": 1, "op": "restore", "seq": seq, "job": "big"})])
        with Admin(address=d.address, timeout=60) as admin:
            # Every restore answered: a few replies queued up to the budget, the rest refused before a read.
            wait_for(lambda: admin.status()["daemon"]["edge"]["replies"]["refused"] >= 50, timeout=60)
            edge = admin.status()["daemon"]["edge"]
        grown = _rss(d.proc.pid) - before
        quota = [a for a in answers if not a["ok"]]
        figure(f"60 unread 8 MiB restores + 20 unread memfd restores under max_reply_bytes=32MiB: daemon RSS "
               f"+{grown / 2**20:.0f} MiB, {edge['replies']}, fd-socket answers: {len(answers) - len(quota)} ok, "
               f"{len(quota)} quota")
        assert edge["replies"]["queued_bytes"] <= 32 * 2**20 + 8 * 2**20 + 2**20, edge
        assert edge["replies"]["restore_buffer_bytes"] == 0, edge
        assert len(answers) - len(quota) == 4, answers  # 4 x 8 MiB fit in 32 MiB; the 5th and later do not
        assert all(a["code"] == "quota" and "quota.max_reply_bytes" in a["message"] for a in quota), quota
        assert grown < 160 * 2**20, f"daemon RSS grew by {grown / 2**20:.0f} MiB"  # the old daemon: ~480 MiB
        # Its replies go with its connection: then the same user is served again.
        lazy.close(0)
        with Admin(address=d.address, timeout=60) as admin:
            wait_for(lambda: admin.status()["daemon"]["edge"]["replies"]["queued_bytes"] == 0, timeout=60)
        with autosaved.Client("big", address=d.address) as c:
            assert c.restore()["w"].shape == (1024**2,)
    finally:
        fd_conn.close()
        ctx.destroy(0)
    assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]


def test_partial_frames_are_bounded_by_connections_times_max_message_bytes(
        tmp_path: Path, figure: Callable[[str], None]) -> None:
    """What libzmq buffers of frames not yet whole (before the daemon sees them) is at most
    ``quota.max_connections`` x ``max_message_bytes`` per user; a frame announced bigger drops its
    connection on its header. (A multipart message's *frames* are each bounded, not their number: an open
    defect of issue 19, see the README's bounds table.)"""
    mib = 1024**2
    max_message, per_user = 16 * mib, 4
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + f"max_message_bytes = {max_message}\n" + NO_AUTO_POLICY
                      + f"[quota]\nmax_connections = {per_user}\n")
    conns: list[socket.socket] = []
    try:
        d.start()
        assert d.proc is not None
        path = d.address.removeprefix("ipc://")
        before = _rss(d.proc.pid)
        # The 600 MiB frame of the defect: dropped on its header, nothing of it held.
        big = zmtp.dealer(path)
        with contextlib.suppress(OSError):
            big.sendall(zmtp.frame_header(600 * mib) + bytes(mib))
        assert zmtp.closed_by_peer(big, 60)
        big.close()
        # 12 connections of one user (root: the cap applies to it too); past 4 they are shut down.
        for _ in range(12):
            with contextlib.suppress(OSError):  # refused before the handshake ended
                conns.append(zmtp.dealer(path))

        def hung_up() -> list[socket.socket]:
            poller = select.poll()
            for c in conns:
                poller.register(c, select.POLLRDHUP)
            gone = {fd for fd, ev in poller.poll(0) if ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)}
            return [c for c in conns if c.fileno() in gone]

        wait_for(lambda: len(conns) - len(hung_up()) <= per_user, timeout=60)
        refused = hung_up()
        kept = [c for c in conns if c not in refused]
        # Each kept connection: 7/8 of a frame of max_message_bytes, sent and read by libzmq (sendall returns
        # once all but the socket buffer is taken), never finished.
        part = bytes(max_message * 7 // 8)
        for c in kept:
            c.sendall(zmtp.frame_header(max_message) + part)
        grown = _rss(d.proc.pid) - before
        bound = per_user * max_message
        figure(f"{len(kept)} connections each holding 7/8 of a {max_message // mib} MiB frame "
               f"({len(refused)} more refused): daemon RSS +{grown / mib:.0f} MiB, bound {bound // mib} MiB "
               f"(quota.max_connections x max_message_bytes)")
        assert len(kept) == per_user, (len(kept), len(refused))
        assert grown <= bound + 16 * mib, (grown, bound)  # 16 MiB: the allocator's and the guard's own
        for c in conns:
            c.close()
        with Admin(address=d.address, timeout=60) as admin:
            admin.ping()
        assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
    finally:
        for c in conns:
            c.close()
        d.cleanup()


# -- the hostile-user run, short ------------------------------------------------------------------------


def test_a_hostile_user_beside_a_well_behaved_one(figure: Callable[[str], None]) -> None:
    """``scripts/hostile_user.py`` for 25 s as real users: no daemon exit, RSS within the budget the config
    implies, every well-behaved update answered. The p99 ratio is a figure here (a ratio of latencies on
    a shared machine is not a guarantee a test can hold); the script asserts it (the 10-minute run)."""
    why = missing()
    if why is not None:
        skip_or_fail(why)
    script = Path(__file__).parent.parent / "scripts" / "hostile_user.py"
    out = subprocess.run([sys.executable, str(script), "--seconds", "25", "--alone", "5", "--json",
                          "--cpu-layout", "flat"],
                         capture_output=True, text=True, timeout=300)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    figure(f"hostile run 25 s: daemon exits {report['daemon_exits']}, RSS max {report['rss_max_mib']:.0f} MiB "
           f"(budget {report['rss_budget_mib']:.0f}), fds max {report['fds_max']}, well-behaved p99 "
           f"{report['alone']['p99_ms']:.1f} ms alone, {report['under_attack']['p99_ms']:.1f} ms under attack "
           f"(x{report['p99_ratio']:.1f}), load {report['load'][0]:.1f}, edge {report['edge']}")
    assert report["daemon_exits"] == 0 and report["stop_exit_code"] == 0, report
    assert report["rss_max_mib"] <= report["rss_budget_mib"], report
    assert report["under_attack"]["errors"] == 0 and report["under_attack"]["restored_step_ok"] == 1.0, report
    assert report["edge"]["ipc"]["refused"] > 0 and report["edge"]["job_locks"] < 50, report
