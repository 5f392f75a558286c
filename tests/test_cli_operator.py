"""The operator's first hour (issue 22): a typo makes no job, unchanged state makes no version,
``status JOB``, and the safety net of ``delete``/``gc``. Real CLI against a real daemon."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable

import msgpack
import zmq

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, version_files, wait_for


def cli(d: PrivateDaemon, *args: str, check: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "autosaved", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AUTOSAVED_ADDRESS": d.address, "AUTOSAVED_STATE_DIR": str(d.state_dir)})
    if check is not None:
        assert proc.returncode == check, f"{args}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def job_dirs(d: PrivateDaemon) -> list[str]:
    root = d.state_dir / "jobs" / str(os.geteuid())
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_a_typo_makes_no_job(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("my-job", address=d.address) as c:
        c.update({"w": 1}, wait="committed")
    for args in (["save", "my-jbo"], ["status", "my-jbo"], ["status", "my-jbo", "--json"],
                 ["restore", "my-jbo", "--out", str(d.root / "out")], ["export", "my-jbo", "--out", str(d.root / "o2")],
                 ["delete", "my-jbo", "--yes"], ["list", "my-jbo"]):
        proc = cli(d, *args, check=3)
        assert "my-jbo" in proc.stderr, proc.stderr
    assert [j["job"] for j in json.loads(cli(d, "list", "--json").stdout)] == ["my-job"]
    assert job_dirs(d) == ["my-job"]
    # A client that only connects and reads creates nothing either.
    with autosaved.Client("ghost", address=d.address) as c:
        assert c.restore() is None
    assert [j["job"] for j in json.loads(cli(d, "list", "--json").stdout)] == ["my-job"]


def test_a_refused_first_update_leaves_no_empty_job(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.address)
    try:
        # A policy the daemon refuses, checked only once the job is in hand (the SDK checks it earlier).
        header = {"v": 1, "op": "update", "seq": 1, "job": "refused", "session": "s1", "tree": {"m": []},
                  "blobs": [], "wait": "accepted", "policy": {"idle": "soon"}}
        sock.send_multipart([msgpack.packb(header, use_bin_type=True)])
        assert sock.poll(30_000)
        reply = msgpack.unpackb(sock.recv_multipart()[0], raw=False, strict_map_key=False)
    finally:
        sock.close(0)
    assert reply["ok"] is False and reply["code"] == "bad_config", reply
    assert json.loads(cli(d, "list", "--json").stdout) == []
    cli(d, "status", "refused", check=3)
    assert job_dirs(d) == []


def test_unchanged_state_makes_no_version(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY + "keep_last = 3\n")
    with autosaved.Client("same", address=d.address) as c:
        c.update({"a": 1, "b": {"c": [1, 2]}, "blob": b"x" * 1000}, step=1)
        assert c.save() == 1
        # Resent values, a DELETE of a key that is not there, the same step: nothing changes.
        c.update({"a": 1, "b": {"c": [1, 2]}, "blob": b"x" * 1000}, step=1)
        c.update({"missing": autosaved.DELETE, "b": {"gone": autosaved.DELETE}})
        assert c.status()["dirty"] is False
        assert c.save() == 1
        assert c.update({"a": 1}, wait="committed").version == 1
        assert len(version_files(d.state_dir, "same")) == 1
        # 1 and True and 1.0 are different leaves; a real change makes a version.
        c.update({"a": True})
        assert c.save() == 2
        c.update({"a": 1.0})
        assert c.save() == 3
        assert cli(d, "save", "same", "--json").stdout.count('"version": 3') == 1
    assert len(version_files(d.state_dir, "same")) == 3


def test_status_of_one_job(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("one", address=d.address) as c:
        c.update({"w": b"abc"}, step=7, wait="committed")
        c.update({"w": b"abcd"})
    one = json.loads(cli(d, "status", "one", "--json").stdout)
    assert (one["job"], one["step"], one["latest_version"], one["dirty"]) == ("one", 7, 1, True)
    text = cli(d, "status", "one").stdout
    assert "job one" in text and "version 1, step 7" in text and "dirty" in text, text


def _on_a_terminal(d: PrivateDaemon, answer: str, *args: str) -> tuple[int, str]:
    """Run the CLI with its stdin (and stdout) on a real pseudo-terminal, typing ``answer``."""
    main, sub = os.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "autosaved", *args], stdin=sub, stdout=sub, stderr=sub,
                                env={**os.environ, "AUTOSAVED_ADDRESS": d.address})
        os.close(sub)
        out = b""
        while b"[y/N]" not in out:
            chunk = os.read(main, 4096)
            assert chunk, out
            out += chunk
        os.write(main, answer.encode() + b"\n")
        code = proc.wait(60)
        try:
            while chunk := os.read(main, 4096):
                out += chunk
        except OSError:  # EIO once the terminal's last user is gone
            pass
        return code, out.decode(errors="replace")
    finally:
        os.close(main)


def test_delete_and_gc_have_a_safety_net(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY + "keep_last = 10\n")
    with autosaved.Client("precious", address=d.address) as c:
        for i in range(4):
            c.update({"w": os.urandom(100_000)}, step=i, wait="committed")  # random: no compression

    plan = json.loads(cli(d, "delete", "precious", "--dry-run", "--json").stdout)
    assert plan["deleted_versions"] == 4 and plan["freed_bytes"] >= 400_000 and plan["dry_run"] is True
    assert "would delete 4 versions" in cli(d, "delete", "precious", "--dry-run").stdout
    cli(d, "delete", "nope", "--dry-run", check=3)
    assert json.loads(cli(d, "gc", "precious", "--dry-run", "--json").stdout)[0]["deleted_versions"] == []
    code, out = _on_a_terminal(d, "n", "delete", "precious")
    assert code == 1 and "4 versions" in out and "not deleted" in out, out

    # The daemon now keeps 2 (SIGHUP reload): the dry run names what the next gc would drop, in bytes too.
    d.config_path.write_text(d.config_path.read_text().replace("keep_last = 10", "keep_last = 2"))
    d.send_signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded trigger=SIGHUP" in d.log())
    dry = json.loads(cli(d, "gc", "precious", "--dry-run", "--json").stdout)
    assert dry[0]["deleted_versions"] == [1, 2] and dry[0]["freed_bytes"] >= 200_000, dry
    assert "dry run: nothing was deleted" in cli(d, "gc", "precious", "--dry-run").stdout
    assert d.stop() == 0
    offline = json.loads(cli(d, "gc", "--offline", "--dry-run", "--json", "--config", str(d.config_path)).stdout)
    assert offline[0]["deleted_versions"] == [1, 2] and offline[0]["freed_bytes"] == dry[0]["freed_bytes"]
    assert len(version_files(d.state_dir, "precious")) == 4

    d.start()
    code, out = _on_a_terminal(d, "y", "delete", "precious")
    assert code == 0 and "deleted here (4 local versions)" in out, out
    assert job_dirs(d) == []
