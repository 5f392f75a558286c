"""Every connection a user opens is bounded and charged to that user (issue 19, defect 1).

Real users (useradd) against a real daemon whose fd limit is set low with ``prlimit`` before it starts:
one user opens far more idle connections than the daemon has fds, on the ZeroMQ socket and on the fd
socket; the daemon stays up, keeps another user's accepted update and serves that user, and the user
over the cap is refused with a ``quota.max_connections`` reason.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq

import autosaved
from autosaved.bench.private import PrivateDaemon
from autosaved.client.admin import Admin
from autosaved.daemon.connguard import refusal
from autosaved.daemon.fdlimit import listener_cap
from autosaved.testing.realusers import User, missing, real_users

from .conftest import NO_AUTO_POLICY, TEST_WRITE_SPEED, skip_or_fail, wait_for

pytestmark = pytest.mark.xdist_group("realusers")


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[list[User], str]]:
    why = missing()
    if why is not None:
        skip_or_fail(why)
    with real_users(2) as made:
        yield made


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


def test_connections_past_the_global_cap_are_refused_not_fatal(tmp_path: Path, figure: Callable[[str], None]) -> None:
    """One user (root here, which the socket's mode does not stop) at the global cap: refused, no abort."""
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + NO_AUTO_POLICY + "[quota]\nmax_connections = 5000\n",
                      command_prefix=["prlimit", "--nofile=1024:1024"])
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 2000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    try:
        d.start()
        assert d.proc is not None
        with autosaved.Client("kept", address=d.address) as c:
            c.update({"k": 1}, wait="accepted")
        dealers = []
        for _ in range(1500):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(d.address)
            dealers.append(s)
        wait_for(lambda: "connections are open on the ipc socket (the limit is 170)" in d.log()
                 or d.proc.poll() is not None, timeout=60)  # type: ignore[union-attr]
        assert d.proc.poll() is None, d.log()[-3000:]
        with Admin(address=d.address, timeout=60) as admin:
            edge = admin.status()["daemon"]["edge"]
        figure(f"1500 connections against an fd limit of 1024: at most {edge['ipc']['peak']} open at once "
               f"(cap {edge['connection_cap']}), {edge['ipc']['refused']} refused")
        for s in dealers:
            s.close(0)
        with autosaved.Client("kept", address=d.address, timeout=60) as c:
            assert c.restore() == {"k": 1}
        assert d.stop(signal.SIGTERM) == 0, d.log()[-3000:]
    finally:
        ctx.term()
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
