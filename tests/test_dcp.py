"""PyTorch Distributed Checkpoint through autosaved: real rank processes (tests/dcp_worker.py) in a gloo
process group over 127.0.0.1, two real daemons with separate state dirs and sockets standing for two
hosts, real SIGKILLs. Each rank process imports torch, so these runs are few and small."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("torch")

from autosaved.integrations import _daemon

from .conftest import NO_AUTO_POLICY, free_port, wait_for

if TYPE_CHECKING:
    from autosaved.testing.private import PrivateDaemon

WORKER = Path(__file__).with_name("dcp_worker.py")
JOB = "llm"
RUN_TIMEOUT = 300.0


def start_ranks(steps: list[dict[str, Any]], daemons: list[PrivateDaemon], out: Path) -> list[subprocess.Popen[bytes]]:
    """One process per rank; rank r talks to daemons[r] (its 'host')."""
    out.mkdir(exist_ok=True)
    for old in out.glob("rank-*.json"):
        old.unlink()
    port = free_port()
    procs = []
    for rank, d in enumerate(daemons):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(len(daemons)), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "AUTOSAVED_ADDRESS": d.address, "DCP_JOB": JOB,
               "OMP_NUM_THREADS": "1"}
        log = (out / f"rank-{rank}.log").open("ab")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(steps), str(out)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def finish(procs: list[subprocess.Popen[bytes]], out: Path) -> tuple[list[int], list[list[dict[str, Any]]]]:
    codes = [p.wait(RUN_TIMEOUT) for p in procs]
    results = []
    for rank in range(len(procs)):
        path = out / f"rank-{rank}.json"
        results.append(json.loads(path.read_text()) if path.exists() else [])
    return codes, results


def wait_while_running(predicate: Callable[[], bool], procs: list[subprocess.Popen[bytes]], out: Path) -> None:
    """Wait for ``predicate``; fail at once, with the ranks' logs, when a rank exits early."""
    def check() -> bool:
        dead = [p.returncode for p in procs if p.poll() is not None]
        assert not dead, f"a rank exited early ({dead}):\n{explain(out)}"
        return predicate()
    wait_for(check, timeout=RUN_TIMEOUT)


def explain(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(out.glob("rank-*")))


def versions(d: PrivateDaemon, job: str) -> list[dict[str, Any]]:
    return _daemon.versions(d.address, job, timeout=30)


def global_ids(d: PrivateDaemon) -> list[int]:
    return [int(v["id"]) for v in versions(d, JOB) if "dcp" in (v.get("meta") or {})]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "autosaved", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the in-process world-size-1 loads
def test_global_versions_across_two_hosts_survive_dead_daemons_and_ranks_and_reshard(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_daemon(NO_AUTO_POLICY), make_daemon(NO_AUTO_POLICY)
    out = tmp_path / "out"
    steps = [
        {"op": "save", "step": 1},
        # Rank 2 (host b) waits before sending its part; the test SIGKILLs host b's daemon meanwhile.
        {"op": "save", "step": 2, "pause": {"rank": 2, "file": "paused", "go": "resume"}},
        {"op": "mark", "name": "failed"},
        {"op": "wait_file", "name": "go"},
        {"op": "load", "step": 1},        # the previous global version still loads
        {"op": "save", "step": 2},        # the retry commits
        {"op": "load", "step": 2},        # into a fresh model: bit-identical
        # Rank 3 SIGKILLs itself right after its part was committed, before the coordinator's finish.
        {"op": "save", "step": 3, "kill_rank": 3},
    ]
    procs = start_ranks(steps, [a, a, b, b], out)
    try:
        wait_while_running(lambda: (out / "paused").exists(), procs, out)
        b.kill()
        (out / "resume").touch()
        wait_while_running(lambda: all((out / f"failed-{r}").exists() for r in range(4)), procs, out)
        # No global version for the failed save, on any daemon: the coordinator never published.
        assert global_ids(a) == [1]
        b.start()
        assert versions(b, JOB) == []
        (out / "go").touch()
        codes, results = finish(procs, out)
    finally:
        for p in procs:
            p.kill()
    assert codes[:3] == [0, 0, 0] and codes[3] == -9, explain(out)
    assert (out / "killed-3").exists()
    for rank, res in enumerate(results):
        assert [r["op"] for r in res] == [s["op"] for s in steps][:len(res)], explain(out)
        save1, failed, _, _, load1, save2, load2, *killed = res
        assert rank == 3 or not killed[0]["ok"], explain(out)  # the others' save failed: rank 3 vanished
        assert save1["ok"] and save1["version"] == 1, explain(out)
        assert not failed["ok"], explain(out)
        assert load1["ok"] and load1["version"] == 1, (rank, load1)
        assert save2["ok"] and save2["version"] == 2, explain(out)   # every rank learns the id
        assert load2["ok"] and load2["version"] == 2, (rank, load2)
    # Rank 2 failed against the dead daemon, and that failure reached the coordinator before it published.
    assert "DaemonUnavailable" in json.dumps(results[2][1]) or "daemon" in results[2][1]["error"].lower()
    assert results[0][5]["coordinator_version"] == 2
    # Each part lives on its own host's daemon. Rank 3's last part was committed ...
    assert [v["id"] for v in versions(b, f"{JOB}.rank-2")][-1] >= 2
    assert versions(a, f"{JOB}.rank-2") == []
    orphan = versions(b, f"{JOB}.rank-3")[-1]["meta"]["dcp_part"]["hash"]
    # ... but no global version was published for that save, on any daemon.
    assert global_ids(a) == [1, 2] and versions(b, JOB) == []

    # World size 2 (one rank per host): the newest version (saved by 4 ranks) loads exactly, the record
    # reaching rank 1 from rank 0 over torch.distributed (host b's daemon has none); a retry commits.
    steps = [{"op": "load", "step": 2}, {"op": "save", "step": 3}, {"op": "load", "step": 3}]
    codes, results = finish(start_ranks(steps, [a, b], out), out)
    assert codes == [0, 0], explain(out)
    for res in results:
        assert all(r["ok"] for r in res), explain(out)
        assert [r["version"] for r in res] == [2, 3, 3]
    assert global_ids(a) == [1, 2, 3]

    # World size 1 on host a, in this process (torch is imported here already): the world-size-4
    # version 1, reading host b's parts from host b's daemon.
    from . import dcp_worker

    monkeypatch.setenv("AUTOSAVED_ADDRESS", a.address)
    load1, load3 = dcp_worker.run([{"op": "load", "step": 1, "version": 1}, {"op": "load", "step": 3}], out,
                                  0, 1, JOB)
    assert load1["ok"] and load1["version"] == 1, explain(out)
    assert load1["sources"] == {"0": a.address, "1": a.address, "2": b.address, "3": b.address}
    assert load3["ok"] and load3["version"] == 3, explain(out)
    # On host b alone, whose daemon never held the record: a clear error, or the record from host a when told.
    monkeypatch.setenv("AUTOSAVED_ADDRESS", b.address)
    missing, told = dcp_worker.run([{"op": "load", "step": 3},
                                    {"op": "load", "step": 3, "record_address": a.address}], out, 0, 1, JOB)
    assert not missing["ok"] and "no committed global version" in missing["error"], missing
    assert told["ok"] and told["version"] == 3 and told["sources"] == {"0": a.address, "1": b.address}, told

    listed = cli("list", JOB, "--json", "--address", a.address)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["world_size"]) for r in rows] == [(1, 4), (2, 4), (3, 2)]
    for row in rows[:2]:
        assert [p["rank"] for p in row["parts"]] == [0, 1, 2, 3]
        assert [p["address"] for p in row["parts"]] == [a.address, a.address, b.address, b.address]
    assert [p["address"] for p in rows[2]["parts"]] == [a.address, b.address]
    assert orphan not in {p["hash"] for r in rows for p in r["parts"]}  # the killed save's part: in no record
    human = cli("list", JOB, "--address", a.address)
    assert "GLOBAL VERSION" in human.stdout and "3:v" in human.stdout

    verified = cli("verify", JOB, "--json", "--address", a.address)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)[0]
    assert all(p["status"] == "ok" for v in report["versions"] for p in v["parts"])
    # A part that goes missing makes verify fail and name it (rank 3's parts of versions 1 and 2).
    deleted = cli("delete", f"{JOB}.rank-3", "--address", b.address)
    assert deleted.returncode == 0, deleted.stderr
    verified = cli("verify", JOB, "--address", a.address)
    assert verified.returncode == 1 and "rank 3" in verified.stdout, verified.stdout + verified.stderr
    assert "llm v3" not in verified.stderr and "llm v2" in verified.stderr


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the in-process world-size-1 load
def test_replicated_global_version_loads_after_every_host_is_lost(
        s3server: Any, make_daemon: Callable[..., PrivateDaemon], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """wait="replicated": every part and the record itself are in the bucket when save returns. Then both
    hosts are lost (daemons SIGKILLed, state dirs deleted) and fresh daemons with the same [remote] start
    on empty dirs: a 2-rank load is bit-exact (the daemons pull the record and the parts from the bucket
    when read), and so is a 1-rank load with no daemon at all (all from the bucket through
    ObjectStoreSource)."""
    from autosaved.integrations.dcp import ObjectStoreSource

    for k, v in s3server.env.items():
        monkeypatch.setenv(k, v)  # the ranks inherit the store's endpoint and credentials
    url = s3server.url(f"dcp-{secrets.token_hex(3)}")
    config = NO_AUTO_POLICY + f'[remote]\nurl = "{url}"\nendpoint = "{s3server.endpoint}"\ntimeout = "5s"\n'
    a, b = make_daemon(config), make_daemon(config)
    out = tmp_path / "out"
    steps = [{"op": "save", "step": 1, "wait": "replicated"}, {"op": "mark", "name": "saved"},
             {"op": "wait_file", "name": "go"}, {"op": "load", "step": 1, "remote": url}]
    procs = start_ranks(steps, [a, b], out)
    try:
        wait_while_running(lambda: all((out / f"saved-{r}").exists() for r in range(2)), procs, out)
        for d in (a, b):  # every host lost; a fresh one (same socket path) starts on an empty state dir
            d.kill()
            shutil.rmtree(d.state_dir)
            d.start()
        for d in (a, b):  # nothing on disk: a read of the record pulls it from the bucket (shared by both)
            assert [int(v["id"]) for v in versions(d, JOB) if "dcp" in (v.get("meta") or {})] == [1]
        bucket = [int(r["id"]) for r in ObjectStoreSource(url).versions(JOB) if "dcp" in (r.get("meta") or {})]
        assert bucket == [1]
        (out / "go").touch()
        codes, results = finish(procs, out)
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], explain(out)
    for res in results:
        save, _, _, load = res
        assert save["ok"] and save["version"] == 1, explain(out)
        assert load["ok"] and load["version"] == 1, (load, explain(out))  # bit-identical tensors
        # The fresh daemons started on empty dirs: each part they served, their read pulled from the bucket.
        assert load["sources"] and set(load["sources"].values()) <= {a.address, b.address}, load

    # No host at all: both daemons gone too. World size 1 in this process, everything from the bucket.
    a.kill()
    b.kill()
    from . import dcp_worker

    monkeypatch.setenv("AUTOSAVED_ADDRESS", a.address)
    (load,) = dcp_worker.run([{"op": "load", "step": 1, "remote": url}], out, 0, 1, JOB)
    assert load["ok"] and load["version"] == 1, load
    assert load["sources"] == {"0": "remote", "1": "remote"}, load


def test_sigterm_flush_commits_accepted_parts_and_record_needs_every_part(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    """wait="accepted": ranks return once their daemon holds the part in memory; the coordinator then
    publishes only parts it finds in a committed version on their daemon (or commits by asking it to
    save). Host b's daemon is SIGTERMed right after rank 1's part was accepted: its shutdown flush
    commits the part (nothing else would: no automatic saves here). Save 1: b is restarted on the same
    state dir before the coordinator checks, finds the flushed part, and the global version commits.
    Save 2: b stays down, the coordinator cannot confirm rank 1's part, so no global version is
    published, although the flush did commit the part (seen once b is back): the record names only
    parts the coordinator confirmed."""
    a, b = make_daemon(NO_AUTO_POLICY), make_daemon(NO_AUTO_POLICY)
    out = tmp_path / "out"
    part1 = f"{JOB}.rank-1"
    steps = [
        {"op": "save", "step": 1, "wait": "accepted", "hold": {"rank": 1, "file": "held1", "go": "go1"}},
        {"op": "save", "step": 2, "wait": "accepted", "hold": {"rank": 1, "file": "held2", "go": "go2"}},
        {"op": "mark", "name": "failed"},
        {"op": "wait_file", "name": "go3"},
        {"op": "load", "step": 1},
    ]
    procs = start_ranks(steps, [a, b], out)
    try:
        wait_while_running(lambda: (out / "held1").exists(), procs, out)
        assert versions(b, part1) == []  # accepted only: in the daemon's memory, in no version yet
        assert b.stop(signal.SIGTERM) == 0
        b.start()
        flushed = versions(b, part1)
        assert len(flushed) == 1 and "dcp_part" in flushed[0]["meta"], flushed  # committed by the flush
        (out / "go1").touch()

        wait_while_running(lambda: (out / "held2").exists(), procs, out)
        assert versions(b, part1) == flushed
        assert b.stop(signal.SIGTERM) == 0  # and b stays down while the coordinator checks
        (out / "go2").touch()
        wait_while_running(lambda: all((out / f"failed-{r}").exists() for r in range(2)), procs, out)
        assert global_ids(a) == [1]  # no global version for save 2
        b.start()
        (out / "go3").touch()
        codes, results = finish(procs, out)
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], explain(out)
    for res in results:
        save1, save2, _, _, load1 = res
        assert save1["ok"] and save1["version"] == 1, explain(out)
        assert not save2["ok"], explain(out)
        assert load1["ok"] and load1["version"] == 1, (load1, explain(out))
    assert "rank 1's part" in results[0][1]["error"] and "nothing published" in results[0][1]["error"]
    # Save 2's part was committed by the flush all the same, but no record names it.
    after = versions(b, part1)
    assert len(after) == 2, after
    record = cli("list", JOB, "--json", "--address", a.address)
    assert record.returncode == 0, record.stderr
    (row,) = json.loads(record.stdout)
    assert [p["version"] for p in row["parts"]] == [versions(a, f"{JOB}.rank-0")[0]["id"], flushed[0]["id"]]
    assert after[1]["meta"]["dcp_part"]["hash"] not in {p["hash"] for p in row["parts"]}


def test_bench_dcp_reports_every_contender() -> None:
    done = cli("bench", "dcp", "--size", "4MiB", "--rounds", "1", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["bytes"] == 4 * 1024**2 and result["autosaved_version"] == 2  # warm-up + one timed save
    for key in ("autosaved_blocking_s", "fs_blocking_s", "memcpy_s", "vs_fs", "vs_memcpy"):
        assert result[key] > 0, key
    bad = cli("bench", "dcp", "--rounds", "0")
    assert bad.returncode == 2 and "--rounds" in bad.stderr
