"""A careless or hostile local user against a real daemon (issue 9): every bad input gets a clear error
and the daemon keeps serving with every accepted state intact; every read path sees what replay rebuilds.

Each test here failed on the code before its fix (see /work/notes/rel.md for the mapping).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

import autosaved
from autosaved.client.slots import create_memfd
from autosaved.daemon.rpcserver import peer_uid
from autosaved.errors import AutosavedError, ProtocolError, QuotaExceeded
from autosaved.protocol import pack_header, unpack_header
from autosaved.shm import fd_socket_path
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, wait_for


def cli(d: PrivateDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autosaved", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AUTOSAVED_ADDRESS": d.address, "AUTOSAVED_STATE_DIR": str(d.state_dir)})


def raw(address: str, op: str, frames: tuple[bytes, ...] = (), **fields: Any) -> dict[str, Any]:
    """One request as any local program could send it, bypassing the SDK's own checks."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(address)
    try:
        sock.send_multipart([pack_header({"v": 1, "op": op, "seq": 1, **fields}), *frames])
        assert sock.poll(30_000), "no reply"
        return unpack_header(sock.recv_multipart()[0])
    finally:
        sock.close(0)


def alive(d: PrivateDaemon) -> None:
    assert d.proc is not None and d.proc.poll() is None, f"daemon exited:\n{d.log()}"
    assert raw(d.address, "ping")["ok"]


def log_dir(d: PrivateDaemon, job: str) -> Path:
    return d.state_dir / "jobs" / str(os.geteuid()) / job / "log"


# -- defect 0: every read path sees what replay rebuilds --------------------------------------------


def test_restore_of_a_job_not_loaded_after_restart_includes_logged_updates(
        make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("j0", address=d.address) as c:
        c.update({"a": 1}, wait="logged")
        c.update({"b": 2}, step=5, wait="logged")
    d.kill()
    d.start()
    # No hello: the job is not loaded when the restore comes.
    c = autosaved.Client("j0", address=d.address)
    try:
        assert c.restore() == {"a": 1, "b": 2}
    finally:
        c.close()
    assert autosaved.restore("j0", state_dir=d.state_dir) == {"a": 1, "b": 2}


def test_every_read_path_after_a_save_and_a_logged_update_sees_the_newest_state(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("j1", address=d.address) as c:
        c.update({"a": 1}, step=1, wait="committed")
        c.update({"a": 2, "c": 3}, step=2, wait="logged")
    d.kill()
    d.start()
    (row,) = [r for r in json.loads(cli(d, "list", "--json").stdout) if r["job"] == "j1"]
    assert row["dirty"] is True and row["latest"] == 1  # not loaded yet, and still the log counts
    out = tmp_path / "out"
    proc = cli(d, "restore", "j1", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "state.json").read_text()) == {"a": 2, "c": 3}
    with autosaved.Client("j1", address=d.address) as c:
        assert c.restore() == {"a": 2, "c": 3}
    with autosaved.Client("j1", address=d.address) as c:
        assert c.status()["step"] == 2
        # The replayed record is saved at once (issue 19, defect 11); a new logged update is not.
        wait_for(lambda: c.status()["last_save_reason"] == "recovery")
        c.update({"c": 4}, step=3, wait="logged")
    # Offline, the CLI's restore and list see the logged update too.
    d.kill()
    (row,) = [r for r in json.loads(cli(d, "list", "--json", "--offline").stdout) if r["job"] == "j1"]
    assert row["dirty"] is True
    out2 = tmp_path / "out2"
    proc = cli(d, "restore", "j1", "--out", str(out2), "--offline")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out2 / "state.json").read_text()) == {"a": 2, "c": 4}


def test_a_job_loaded_with_replayed_records_is_saved_without_another_wake_up(
        make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon('[policy]\nidle = "0.3s"\nmin_gap = "0s"\ninterval = "off"\ndirty_bytes = "off"\n')
    with autosaved.Client("j9", address=d.address) as c:
        c.update({"a": 1}, wait="logged")
        d.kill()  # before the idle save
    d.start()
    versions = d.state_dir / "jobs" / str(os.geteuid()) / "j9" / "versions"
    assert not list(versions.glob("*.json"))
    with autosaved.Client("j9", address=d.address) as c:
        c.connect()  # loads the job; nothing else happens on the daemon from here on
    wait_for(lambda: list(versions.glob("*.json")), timeout=30)


# -- defect 1: validated at the edge; one failure is one request's or one job's ---------------------


@pytest.mark.parametrize("wait", ["accepted", "logged", "committed"])
def test_meta_the_manifest_cannot_hold_is_refused_at_the_edge(make_daemon: Callable[..., PrivateDaemon],
                                                              wait: str) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("m", address=d.address) as c:
        with pytest.raises(ProtocolError, match="meta"):
            c.update({"x": 1}, meta={"x": {1: 0, "a": 0}}, wait=wait)  # mixed key types: no sort order
        c.update({"x": 2}, meta={"x": {1: 0}}, wait=wait)
        assert c.save() >= 1
        assert c.restore() == {"x": 2}
    alive(d)
    d.kill()
    d.start()  # nothing poisoned was logged: the restart serves
    alive(d)
    with autosaved.Client("m", address=d.address) as c:
        assert c.restore() == {"x": 2}


def test_fd_socket_drop_with_an_unhashable_slot_is_an_error_reply(daemon: PrivateDaemon) -> None:
    path = fd_socket_path(daemon.address)
    assert path is not None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(30)
    sock.connect(path)
    try:
        hello = msgpack.unpackb(sock.recv(4096))
        assert "token" in hello
        fd, mapping = create_memfd(4096)  # sealed against shrinking, as the daemon wants
        socket.send_fds(sock, [msgpack.packb({"op": "add", "slot": 1, "size": 4096})], [fd])
        assert msgpack.unpackb(sock.recv(4096))["ok"]
        for bad in ({"op": "drop", "slot": [1]}, {"op": "drop", "slot": {"a": 1}}, {"op": "add", "slot": [1]},
                    {"op": 1}, [1, 2], b"\xc1"):
            sock.send(bad if isinstance(bad, bytes) else msgpack.packb(bad))
            reply = msgpack.unpackb(sock.recv(4096))
            assert reply["ok"] is False and reply["message"], bad
        sock.send(msgpack.packb({"op": "drop", "slot": 1}))
        assert msgpack.unpackb(sock.recv(4096))["ok"]
        os.close(fd)
        mapping.close()
    finally:
        sock.close()
    alive(daemon)


# -- defect 5: what the log accepts it replays; damage in the middle is never cut -----------------------


def _deep(depth: int, leaf: Any) -> dict[str, Any]:
    tree: Any = leaf
    for _ in range(depth):
        tree = {"k": tree}
    return tree  # type: ignore[no-any-return]


def test_a_logged_delta_at_the_depth_limit_merged_over_a_scalar_replays(
        make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("deep", address=d.address) as c:
        c.update({"k": 1})  # accepted: held for the next record
        c.update(_deep(64, 1), wait="logged")  # 64 nested mappings: the leaf at the allowed depth
        c.update({"after": 1}, wait="logged")
    d.kill()
    assert autosaved.restore("deep", state_dir=d.state_dir) == {**_deep(64, 1), "after": 1}
    d.start()
    with autosaved.Client("deep", address=d.address) as c:
        assert c.restore() == {**_deep(64, 1), "after": 1}
    assert "torn" not in d.log()


def test_a_bad_record_in_the_middle_of_a_segment_is_damage_not_a_torn_tail(
        make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("mid", address=d.address) as c:
        for step in range(1, 4):
            c.update({"step": step}, wait="logged")
    d.kill()
    (segment,) = sorted(log_dir(d, "mid").glob("*.wal"))
    data = bytearray(segment.read_bytes())
    second = data.find(b"ASW1", 1)
    data[second + 40] ^= 0xFF  # a flipped byte in record 2's payload; record 3 stays whole
    segment.write_bytes(bytes(data))
    before = segment.read_bytes()
    with pytest.raises(AutosavedError, match="damaged"):
        autosaved.restore("mid", state_dir=d.state_dir)
    d.start()
    c = autosaved.Client("mid", address=d.address)
    with pytest.raises(AutosavedError, match="damaged"):
        c.connect()
    c.close()
    alive(d)
    assert segment.read_bytes() == before  # nothing acknowledged was cut
    report = json.loads(cli(d, "verify", "mid", "--json").stdout)
    assert report[0]["log"]["damaged"] and report[0]["ok"] is False


# -- defect 7: one user cannot exhaust the daemon ------------------------------------------------------


def test_quota_counts_string_leaves(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY + '[quota]\nmax_bytes = "1MiB"\n')
    if os.geteuid() != 0:
        with autosaved.Client("q", address=d.address) as c, pytest.raises(QuotaExceeded):
            c.update({"text": "x" * (2 * 1024 * 1024)})
        return
    # Root is exempt from quotas, but acts on another uid's jobs with ``owner``: that uid's quota applies.
    big = "x" * (2 * 1024 * 1024)
    reply = raw(d.address, "update", job="q", session="s", tree={"m": [["text", big]]}, blobs=[], owner=4242)
    assert reply["ok"] is False and reply["code"] == "quota", reply
    small = raw(d.address, "update", job="q", session="s", tree={"m": [["text", "x" * 1000]]}, blobs=[],
                owner=4242)
    assert small["ok"], small
    alive(d)


def test_requests_in_flight_per_user_are_capped(make_daemon: Callable[..., PrivateDaemon],
                                                tmp_path: Path) -> None:
    # The first save stalls 5 s before its manifest: the committed updates stay in flight until then.
    faults = tmp_path / "faults"
    faults.write_text("manifest.open.before 1 sleep5\n")
    d = make_daemon(NO_AUTO_POLICY + '[quota]\nmax_requests = 2\n', env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(d.address)
    try:
        for seq in range(1, 4):
            sock.send_multipart([pack_header({"v": 1, "op": "update", "seq": seq, "job": "f", "session": "s",
                                              "tree": {"m": [["a", seq]]}, "blobs": [], "wait": "committed"})])
        assert sock.poll(30_000)
        reply = unpack_header(sock.recv_multipart()[0])
        assert reply["ok"] is False and reply["code"] == "quota" and reply["seq"] == 3
        assert "max_requests" in reply["message"]
        assert d.proc is not None and d.proc.poll() is None
        got = set()
        while len(got) < 2 and sock.poll(30_000):
            r = unpack_header(sock.recv_multipart()[0])
            assert r["ok"], r
            got.add(r["seq"])
        assert got == {1, 2}
        alive(d)  # and with them done, the next request is served
    finally:
        sock.close(0)


def test_shared_memory_per_user_is_capped(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY + '[quota]\nmax_shm_bytes = "1MiB"\n')
    path = fd_socket_path(d.address)
    assert path is not None
    conns = []
    try:
        for want_ok in (True, False):  # two connections of one user: the second slot passes the cap
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(30)
            sock.connect(path)
            conns.append(sock)
            assert "token" in msgpack.unpackb(sock.recv(4096))
            fd, mapping = create_memfd(768 * 1024)
            socket.send_fds(sock, [msgpack.packb({"op": "add", "slot": 1, "size": 768 * 1024})], [fd])
            reply = msgpack.unpackb(sock.recv(4096))
            os.close(fd)
            mapping.close()
            assert reply["ok"] is want_ok, reply
            if not want_ok:
                assert "max_shm_bytes" in reply["message"]
    finally:
        for sock in conns:
            sock.close()
    alive(d)


def test_default_max_message_bytes_is_bounded() -> None:
    from autosaved.config import Config

    assert Config(address="ipc:///x", state_dir=Path("/x")).max_message_bytes <= 1024**3


# -- defect 8: an unknown peer is refused, never taken for the daemon's own user ---------------------


def test_peer_uid_of_an_unknown_peer_is_none() -> None:
    class NoCredentials:
        def get(self, _name: str) -> str:
            raise zmq.ZMQError(zmq.EINVAL)

    class NoUid:
        def get(self, _name: str) -> str:
            return "127.0.0.1"

    assert peer_uid(NoCredentials()) is None
    assert peer_uid(NoUid()) is None

    class Ipc:
        def get(self, _name: str) -> str:
            return "/tmp/x.sock:1000:1000:42"

    assert peer_uid(Ipc()) == 1000


# -- defect 9: files, folders and locks ----------------------------------------------------------------


def test_restore_out_and_export_write_private_files(make_daemon: Callable[..., PrivateDaemon],
                                                    tmp_path: Path) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("p", address=d.address) as c:
        c.update({"w": np.arange(10, dtype=np.float32)}, wait="committed")
    old = os.umask(0o022)
    try:
        for verb in ("restore", "export"):
            out = tmp_path / verb / "out"
            proc = cli(d, verb, "p", "--out", str(out))
            assert proc.returncode == 0, proc.stderr
            assert stat.S_IMODE(out.stat().st_mode) == 0o700
            for f in out.iterdir():
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        os.umask(old)


def test_import_needs_the_job_named(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("victim", address=d.address) as c:
        c.update({"keep": 1, "mine": 2}, wait="committed")
    with autosaved.Client("other", address=d.address) as c:
        c.update({"x": 1}, wait="committed")
    out = tmp_path / "exp"
    assert cli(d, "export", "other", "--out", str(out)).returncode == 0
    info = json.loads((out / "autosaved.json").read_text())
    info["job"] = "victim"  # a hostile folder names one of your jobs
    (out / "autosaved.json").write_text(json.dumps(info))
    proc = cli(d, "import", str(out))
    assert proc.returncode != 0 and "--job" in proc.stderr
    with autosaved.Client("victim", address=d.address) as c:
        assert c.restore() == {"keep": 1, "mine": 2}
    proc = cli(d, "import", str(out), "--job", "copy")
    assert proc.returncode == 0, proc.stderr
    with autosaved.Client("copy", address=d.address) as c:
        assert c.restore() == {"x": 1}


def test_pid_lock_refuses_a_symlink(tmp_path: Path) -> None:
    from autosaved.daemon.lock import PidLock

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / "daemon.lock"
    link.symlink_to(victim)
    with pytest.raises(AutosavedError, match="symbolic link"):
        PidLock(link, "test").acquire()
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("problem", ["world-writable", "group-writable", "other owner"])
def test_state_dir_with_a_bad_owner_or_mode_is_refused(make_daemon: Callable[..., PrivateDaemon],
                                                       problem: str) -> None:
    if problem == "other owner" and os.geteuid() != 0:
        pytest.skip("needs root to chown")
    d = make_daemon(NO_AUTO_POLICY, start=False)
    d.state_dir.mkdir(mode=0o700)
    if problem == "world-writable":
        os.chmod(d.state_dir, 0o777)
    elif problem == "group-writable":
        os.chmod(d.state_dir, 0o770)
    else:
        os.chown(d.state_dir, 4243, 4243)
    with pytest.raises(AutosavedError) as info:
        d.start(timeout=30)
    assert "state_dir" in str(info.value)
    assert "writable" in str(info.value) or "owned by uid" in str(info.value)



def test_an_int_past_the_digit_limit_is_refused_naming_the_limit() -> None:
    """An int of more than ``MAX_INT_DIGITS`` digits is refused with a message that says so (it read
    "unknown or misplaced node tag 'I'"); one at the limit is kept exactly."""
    from autosaved.daemon.rpcupdate import _decode_delta
    from autosaved.errors import ProtocolError
    from autosaved.tree import MAX_INT_DIGITS, to_node

    at_limit = int("9" * MAX_INT_DIGITS)
    node, blobs = to_node({"n": at_limit}, allow_delete=True)
    assert _decode_delta(node, blobs, 0)["n"] == at_limit
    node, blobs = to_node({"n": 10**MAX_INT_DIGITS}, allow_delete=True)
    with pytest.raises(ProtocolError, match=f"an int of {MAX_INT_DIGITS + 1} digits: at most {MAX_INT_DIGITS}"):
        _decode_delta(node, blobs, 0)
