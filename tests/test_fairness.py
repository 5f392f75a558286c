"""One user's expensive requests do not hold up another user's cheap ones, and a request whose client gave
up is never applied late (issue 19: head-of-line blocking on the daemon's event loop; defect (d)).

Real daemons over real sockets. The ordering test runs its two clients as real non-root users; the pure
policy (who is served next) is tests/test_fairqueue.py.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq

import autosaved
from autosaved.client.admin import Admin
from autosaved.errors import DaemonUnavailable
from autosaved.protocol import pack_header, unpack_header
from autosaved.testing.private import PrivateDaemon
from autosaved.testing.realusers import User

from .conftest import NO_AUTO_POLICY, TEST_WRITE_SPEED, fault_fired, wait_for

pytestmark = pytest.mark.xdist_group("realusers")


def edge(d: PrivateDaemon) -> dict[str, object]:
    with Admin(address=d.address, timeout=30) as admin:
        result: dict[str, object] = admin.status()["daemon"]["edge"]
        return result


# -- a request whose client has given up ----------------------------------------------------------------


def test_an_update_whose_client_gave_up_while_the_loop_stalled_is_never_applied(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    """The event loop hangs for 4 s at the edge of the next request (fault point ``task.rpc.before``):
    that request, an update from a client whose timeout is 1 s, is received and started only after its
    client gave up. It is dropped with ``expired`` (counted), never merged late. A client that sends no
    deadline (an older SDK) is served as before."""
    faults = tmp_path / "faults"
    faults.write_text("")
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("j", address=d.address, timeout=30) as c:
        c.update({"k": 1})
    faults.write_text("task.rpc.before 1 sleep:4\n")
    late = autosaved.Client("j", address=d.address, timeout=1)
    try:
        with pytest.raises(DaemonUnavailable):
            late.update({"k": 2, "late": True})
    finally:
        late.close()
    wait_for(lambda: edge(d)["requests_expired"] == 1, timeout=60)
    with autosaved.Client("j", address=d.address, timeout=30) as c:
        assert c.restore() == {"k": 1}
    assert "code=expired" in d.log()
    # No deadline in the header (an old client): applied whenever it is served, as before.
    faults.write_text("task.rpc.before 1 sleep:2\n")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    try:
        sock.connect(d.address)
        sock.send_multipart([pack_header({"v": 1, "op": "update", "seq": 1, "job": "j", "session": "old",
                                          "tree": {"m": [["k", 3]]}})])
        assert sock.poll(60_000), "no reply"
        assert unpack_header(sock.recv_multipart()[0])["ok"]
    finally:
        sock.close(0)
    with autosaved.Client("j", address=d.address, timeout=30) as c:
        assert c.restore() == {"k": 3}
    assert edge(d)["requests_expired"] == 1


# -- one user's expensive stream beside another user's cheap request -------------------------------------


# User A: N updates of job "a", each with a big header (5,000 small maps: over offload.OFFLOAD_MIN), sent at
# once on one DEALER. On "count" from stdin: how many replies have come so far; then every reply, in order.
EXPENSIVE = """
import json, sys, zmq
from autosaved.protocol import pack_header, unpack_header
from autosaved.tree import to_node
address, n = sys.argv[1], int(sys.argv[2])
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(address)
for i in range(1, n + 1):
    node, _ = to_node({"k": i, f"m{i}": {str(j): {"a": j} for j in range(5000)}}, allow_delete=True)
    sock.send_multipart([pack_header({"v": 1, "op": "update", "seq": i, "job": "a", "session": "s", "tree": node})])
print(json.dumps({"sent": n}), flush=True)
sys.stdin.readline()
replies = []
while sock.poll(0):
    replies.append(unpack_header(sock.recv_multipart()[0]))
print(json.dumps({"before": len(replies)}), flush=True)
while len(replies) < n:
    assert sock.poll(120_000), "no reply"
    replies.append(unpack_header(sock.recv_multipart()[0]))
print(json.dumps({"seqs": [r["seq"] for r in replies], "ok": all(r["ok"] for r in replies)}), flush=True)
"""

# User B: connects and says hello first; on a line from stdin, one small update, then prints its ack.
CHEAP = """
import json, sys, autosaved
with autosaved.Client("b", address=sys.argv[1], timeout=120) as c:
    c.connect()
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()
    ack = c.update({"x": 1})
    print(json.dumps({"ack": ack.level}), flush=True)
"""

RESTORE = """
import json, sys, autosaved
with autosaved.Client(sys.argv[2], address=sys.argv[1], timeout=120) as c:
    print(json.dumps(c.restore()["k"]))
"""


def _line(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the client exited: {proc.wait()}"
    result: dict[str, object] = json.loads(line)
    return result


def _say(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def test_a_cheap_request_is_served_while_another_users_expensive_stream_waits(
        users: tuple[list[User], str], tmp_path: Path) -> None:
    """User A pipelines 6 big updates; the first one's decode is held in its worker thread (fault point
    ``offload.decode.before``, a 15 s sleep), A's other 5 wait queued behind it. User B's small update is
    served meanwhile: none of A's requests is answered before B's. Then every one of A's is applied, in
    the order A sent them. (Before issue 19's fix the event loop decoded each of A's in turn and B waited
    for them; here the order proves it, not a clock.)"""
    (a_user, b_user), group = users
    faults = tmp_path / "faults"
    faults.write_text("")
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + f'socket_group = "{group}"\n' + NO_AUTO_POLICY,
                      log_level="debug", env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        d.start()
        b = b_user.python(textwrap.dedent(CHEAP), d.address, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(b)
        assert _line(b) == {"ready": True}
        faults.write_text("offload.decode.before 1 sleep:15\n")
        a = a_user.python(textwrap.dedent(EXPENSIVE), d.address, "6", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(a)
        assert _line(a) == {"sent": 6}
        fault_fired(faults, "offload.decode.before")  # A's first update is being decoded, the rest queued
        _say(b)
        assert _line(b) == {"ack": "accepted"}
        _say(a)
        assert _line(a) == {"before": 0}  # none of A's was answered before B's
        assert _line(a) == {"seqs": [1, 2, 3, 4, 5, 6], "ok": True}
        restored = a_user.python(RESTORE, d.address, "a", stdout=subprocess.PIPE)
        out, _ = restored.communicate(timeout=120)
        assert json.loads(out) == 6  # the last one A sent is the last one applied
        for p in procs:
            assert p.wait(60) == 0
        assert d.proc is not None and d.proc.poll() is None, d.log()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        d.cleanup()


# User A: "make": a job whose leaf is stored; "flood": 10 restores of it sent at once on one DEALER, after
# a line from stdin; prints how many were answered ok.
RESTORES = """
import json, sys, numpy as np, zmq, autosaved
from autosaved.protocol import pack_header, unpack_header
address, phase = sys.argv[1], sys.argv[2]
if phase == "make":
    with autosaved.Client("r", address=address, timeout=120) as c:
        c.update({"arr": np.ones(100_000, np.uint8)}, wait="committed")
    raise SystemExit(0)
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(address)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()
for i in range(1, 11):
    sock.send_multipart([pack_header({"v": 1, "op": "restore", "seq": i, "job": "r"})])
ok = 0
for _ in range(10):
    assert sock.poll(120_000), "no reply"
    ok += unpack_header(sock.recv_multipart()[0])["ok"]
print(json.dumps({"ok": ok}), flush=True)
"""


def test_a_user_has_at_most_8_restores_running_and_the_rest_wait_their_turn(
        users: tuple[list[User], str], tmp_path: Path) -> None:
    """User A sends 10 restores at once; the first one's read is held (fault point ``restore.read.before``,
    the others wait for the job's io lock): 8 run, the other 2 wait in A's queue (``requests_queued``),
    where before each of the 10 was a task on the event loop. All 10 are answered once the read goes on."""
    (a_user, _), group = users
    faults = tmp_path / "faults"
    faults.write_text("")
    d = PrivateDaemon(tmp_path / "d", config=TEST_WRITE_SPEED + f'socket_group = "{group}"\n' + NO_AUTO_POLICY,
                      log_level="debug", env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    flood: subprocess.Popen[bytes] | None = None
    try:
        d.start()
        made = a_user.python(textwrap.dedent(RESTORES), d.address, "make")
        assert made.wait(120) == 0
        d.kill()
        d.start()  # the job is loaded again by the first restore: its leaf is read from its chunk files
        flood = a_user.python(textwrap.dedent(RESTORES), d.address, "flood", stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
        assert _line(flood) == {"ready": True}
        faults.write_text("restore.read.before 1 sleep:10\n")
        _say(flood)
        fault_fired(faults, "restore.read.before")
        wait_for(lambda: edge(d)["requests_queued"] == 2, timeout=60)
        assert _line(flood) == {"ok": 10}
        assert flood.wait(60) == 0
        assert edge(d)["requests_queued"] == 0
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
            flood.wait()
        d.cleanup()


def test_a_connection_past_its_users_refusal_budget_is_muted_for_the_rest_of_that_second() -> None:
    """Past :data:`REFUSALS_PER_S` answered refusals, the connection that went over is dropped before its
    header is read until the second turns (the daemon's core, in process: a clock of our own)."""
    from autosaved.daemon.rpcserver import REFUSALS_PER_S, RefusalBudget

    budget = RefusalBudget()
    assert all(budget.allow(7, 100.1) for _ in range(REFUSALS_PER_S))
    assert not budget.allow(7, 100.2)
    assert not budget.muted(b"conn-a", 100.2)  # nothing is muted until the server says so
    budget.mute(b"conn-a")
    assert budget.muted(b"conn-a", 100.9) and not budget.muted(b"conn-b", 100.9)
    assert budget.allow(8, 100.9)  # another user's budget is its own
    assert not budget.muted(b"conn-a", 101.0)  # a new second: read again, and answered again
    assert budget.allow(7, 101.0)
