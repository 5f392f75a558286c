"""Multi-user isolation with two real Unix users talking to one daemon over its ipc socket.

The users are created here (useradd) and removed afterwards, so this needs root; elsewhere it is
skipped. The clients run as those users in subprocesses (setpriv), so the daemon sees their real uids
through SO_PEERCRED, exactly as on a shared training host.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import skip_or_fail

# One pytest-xdist worker runs this whole module (--dist loadgroup): its tests share two real users.
pytestmark = pytest.mark.xdist_group("test_security")


@pytest.fixture(scope="module", autouse=True)
def _needs_root() -> None:
    # A skip elsewhere; a failure under .ci/run (AUTOSAVED_REQUIRE_ROOT_TESTS=1), so the "another user's
    # job" row of the guarantees table never goes unproven unseen.
    if os.geteuid() != 0 or shutil.which("useradd") is None or shutil.which("setpriv") is None:
        skip_or_fail("needs root with useradd and setpriv, to create two real users and run clients as them")

# A client prelude: raw requests, so a test can send what a hostile user would (another user's uid).
PRELUDE = """
import json, sys, zmq, autosaved
from autosaved.protocol import pack_header, unpack_header
ADDRESS = {address!r}
def raw(op, **fields):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(ADDRESS)
    sock.send_multipart([pack_header({{"v": 1, "op": op, "seq": 1, **fields}})])
    assert sock.poll(10000), "no reply"
    reply = unpack_header(sock.recv_multipart()[0])
    sock.close(0)
    return reply
"""


@dataclass
class User:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[User, User, str]]:
    tag = secrets.token_hex(3)
    group = f"asg{tag}"
    subprocess.run(["groupadd", group], check=True)
    made: list[User] = []
    try:
        for who in ("a", "b"):
            name = f"as{who}{tag}"
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "-G", group, name],
                           check=True)
            pw = pwd.getpwnam(name)
            made.append(User(name, pw.pw_uid, pw.pw_gid))
        yield made[0], made[1], group
    finally:
        for u in made:
            subprocess.run(["userdel", u.name], check=False)
        subprocess.run(["groupdel", group], check=False)


def run_as(user: User | None, address: str, code: str) -> dict[str, object]:
    """Run ``code`` (after PRELUDE) as ``user`` (root when None); it prints one JSON value last."""
    prefix = [] if user is None else ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--init-groups"]
    proc = subprocess.run([*prefix, sys.executable, "-c", PRELUDE.format(address=address) + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture
def shared_daemon(make_daemon: Callable[..., PrivateDaemon], users: tuple[User, User, str]) -> PrivateDaemon:
    _, _, group = users
    return make_daemon(f'socket_group = "{group}"\n[policy]\nidle = "off"\ninterval = "off"\nmin_gap = "0s"\n'
                       '[quota]\nmax_jobs = 2\nmax_bytes = "1MiB"\n')


def test_socket_dir_lets_only_the_daemon_user_and_its_group_in(shared_daemon: PrivateDaemon,
                                                               users: tuple[User, User, str]) -> None:
    sock_dir = shared_daemon.sock_dir
    sock = Path(shared_daemon.address.removeprefix("ipc://"))
    import grp

    gid = grp.getgrnam(users[2]).gr_gid
    assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o750 and sock_dir.stat().st_gid == gid
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660 and sock.stat().st_gid == gid


def test_users_cannot_read_write_list_or_delete_each_others_jobs(
    shared_daemon: PrivateDaemon, users: tuple[User, User, str],
) -> None:
    a, b, _ = users
    addr = shared_daemon.address
    got = run_as(a, addr, """
        with autosaved.Client("secret", address=ADDRESS) as c:
            c.update({"password": "hunter2", "w": b"a" * 100}, step=1)
            print(json.dumps({"version": c.save()}))
    """)
    assert got == {"version": 1}
    # the daemon namespaced the job by a's real uid
    assert (shared_daemon.state_dir / "jobs" / str(a.uid) / "secret" / "versions").is_dir()

    got = run_as(b, addr, f"""
        out = {{}}
        with autosaved.Client("secret", address=ADDRESS) as c:
            out["read_same_name"] = c.restore()         # b's own (empty) job of that name, not a's
        out["listing"] = raw("list", job=None)["jobs"]
        for op, extra in (("restore", {{}}), ("list", {{}}), ("status", {{}}), ("delete", {{}}), ("save", {{}}),
                          ("update", {{"session": "s", "tree": {{"m": [["password", "pwned"]]}}, "blobs": []}})):
            r = raw(op, job="secret", owner={a.uid}, **extra)
            out[op] = [r["ok"], r.get("code"), r.get("message")]
        out["delete_own"] = raw("delete", job="secret").get("code")
        print(json.dumps(out))
    """)
    assert got["read_same_name"] is None
    # b sees none of a's jobs (and has none: connecting and reading create no job, issue 22)
    assert got["listing"] == []
    for op in ("restore", "list", "status", "delete", "save", "update"):
        ok, code, message = got[op]  # type: ignore[misc]
        assert (ok, code) == (False, "forbidden"), (op, got[op])
        assert f"uid {b.uid} may not act on jobs of uid {a.uid}" in str(message)
    assert got["delete_own"] == "not_found"  # b has no "secret" of its own; a's is untouched

    # a's job is intact, through the daemon and on disk
    got = run_as(a, addr, """
        with autosaved.Client("secret", address=ADDRESS) as c:
            s = c.restore()
        print(json.dumps({"password": s["password"], "w": len(s["w"]), "jobs": raw("list", job=None)["jobs"]}))
    """)
    assert got["password"] == "hunter2" and got["w"] == 100
    assert [j["job"] for j in got["jobs"]] == ["secret"]  # type: ignore[union-attr]
    assert autosaved.restore("secret", state_dir=shared_daemon.state_dir, owner=a.uid)["password"] == "hunter2"

    # root may administer: list everyone's jobs, read and delete a's
    got = run_as(None, addr, f"""
        jobs = raw("list", job=None)["jobs"]
        r = raw("restore", job="secret", owner={a.uid})
        d = raw("delete", job="secret", owner={a.uid})
        print(json.dumps({{"owners": sorted({{j["owner"] for j in jobs}}), "restored": r["ok"],
                          "deleted": d.get("deleted_versions")}}))
    """)
    assert a.uid in got["owners"] and got["restored"] is True and got["deleted"] == 1  # type: ignore[operator]
    assert not (shared_daemon.state_dir / "jobs" / str(a.uid) / "secret").exists()


def test_state_files_are_private_to_the_daemon(shared_daemon: PrivateDaemon, users: tuple[User, User, str]) -> None:
    a, _, _ = users
    run_as(a, shared_daemon.address, """
        with autosaved.Client("files", address=ADDRESS) as c:
            c.update({"w": b"x" * 1000})
            print(json.dumps({"v": c.save()}))
    """)
    checked = 0
    for root, dirs, files in os.walk(shared_daemon.state_dir):
        for name in dirs + files:
            mode = stat.S_IMODE(os.lstat(os.path.join(root, name)).st_mode)
            assert mode & 0o077 == 0, (os.path.join(root, name), oct(mode))
            checked += 1
    assert checked > 5


def test_quotas_give_clear_errors_and_apply_nothing(shared_daemon: PrivateDaemon,
                                                   users: tuple[User, User, str]) -> None:
    a, b, _ = users
    got = run_as(a, shared_daemon.address, """
        out = {}
        with autosaved.Client("q1", address=ADDRESS) as c:
            c.update({"w": b"x" * 600_000})
            try:
                c.update({"more": b"y" * 600_000})
            except autosaved.AutosavedError as exc:
                out["bytes"] = [exc.code, exc.message]
            c.update({"w": b"z" * 900_000})   # replacing a leaf is fine: the total stays under 1 MiB
            state = c.restore()
            out["q1"] = [len(state["w"]), "more" in state]
        with autosaved.Client("q2", address=ADDRESS) as c:
            c.update({"n": 1})
        try:
            autosaved.Client("q3", address=ADDRESS).connect()
        except autosaved.AutosavedError as exc:
            out["jobs"] = [exc.code, exc.message]
        print(json.dumps(out))
    """)
    assert got["bytes"][0] == "quota" and "quota.max_bytes" in got["bytes"][1]  # type: ignore[index]
    assert got["q1"] == [900_000, False]  # the refused update left nothing behind
    assert got["jobs"][0] == "quota" and "quota.max_jobs" in got["jobs"][1]  # type: ignore[index]
    assert "already has 2 jobs (the limit is 2)" in got["jobs"][1]  # type: ignore[index]
    # quotas are per user: b starts from zero
    got = run_as(b, shared_daemon.address, """
        with autosaved.Client("q1", address=ADDRESS) as c:
            c.update({"w": b"x" * 600_000})
        print(json.dumps({"ok": True}))
    """)
    assert got == {"ok": True}


def test_cli_exit_code_4_for_another_users_job(shared_daemon: PrivateDaemon, users: tuple[User, User, str],
                                               tmp_path: Path) -> None:
    """The real CLI, run as user b against user a's job: refused with exit code 4 and a clear message;
    nothing of a's is changed."""
    a, b, _ = users
    run_as(a, shared_daemon.address, """
        with autosaved.Client("mine", address=ADDRESS) as c:
            c.update({"w": b"a" * 100}, wait="committed")
            print(json.dumps({"ok": True}))
    """)
    out = tmp_path / "out"
    out.mkdir()
    os.chown(out, b.uid, b.gid)
    prefix = ["setpriv", f"--reuid={b.uid}", f"--regid={b.gid}", "--init-groups", sys.executable, "-m", "autosaved"]
    env = {**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "AUTOSAVED_ADDRESS": shared_daemon.address}
    for args in (["restore", "mine", "--owner", str(a.uid), "--out", str(out / "r")],
                 ["delete", "mine", "--owner", str(a.uid)]):
        proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 4, (args, proc.returncode, proc.stdout, proc.stderr)
        assert f"uid {b.uid} may not act on jobs of uid {a.uid}" in proc.stderr, proc.stderr
    assert not (out / "r").exists()
    assert autosaved.restore("mine", state_dir=shared_daemon.state_dir, owner=a.uid) == {"w": b"a" * 100}
