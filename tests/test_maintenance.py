"""Retention (pure), incremental saves seen from status, and the verify / gc commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

import autosaved
from autosaved.storage.retention import versions_to_delete
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, first_chunk

H = 3600.0


@pytest.mark.parametrize(
    ("versions", "keep_last", "keep_every", "protect", "doomed"),
    [
        ([(1, 0.0), (2, 10.0), (3, 20.0)], 3, None, set(), []),
        ([(1, 0.0), (2, 10.0), (3, 20.0), (4, 30.0)], 2, None, set(), [1, 2]),
        # one per hour: the newest of hour 0 (id 2) and of hour 1 (id 4) stay, besides the last one
        ([(1, 0.0), (2, 0.5 * H), (3, 1.1 * H), (4, 1.9 * H), (5, 2.2 * H)], 1, H, set(), [1, 3]),
        # protected (the newest verified) survives even beyond keep_last
        ([(1, 0.0), (2, 10.0), (3, 20.0)], 1, None, {1}, [2]),
        # unknown times: never kept by keep_every, still counted by keep_last
        ([(1, None), (2, None), (3, 5.0)], 2, H, set(), [1]),
        ([], 3, H, set(), []),
    ],
)
def test_versions_to_delete(versions: list[tuple[int, float | None]], keep_last: int, keep_every: float | None,
                            protect: set[int], doomed: list[int]) -> None:
    assert versions_to_delete(versions, keep_last=keep_last, keep_every=keep_every,
                              protect=frozenset(protect)) == doomed


def test_a_save_writes_about_what_changed(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon('chunk_size = "1MiB"\n' + NO_AUTO_POLICY)
    rng = np.random.default_rng(3)
    layers = {f"layer{i}": rng.random(256 * 1024, dtype=np.float32) for i in range(32)}  # 32 MiB in 32 leaves
    with autosaved.Client("inc", address=d.address) as c:
        c.update({"model": layers}, wait="committed")
        first = c.status()["bytes_written"]
        assert first >= 32 * 2**20
        c.update({"model": {"layer7": rng.random(256 * 1024, dtype=np.float32)}}, wait="committed")
        one_leaf = c.status()["bytes_written"] - first
        assert 2**20 <= one_leaf < 2**20 + 256 * 1024  # the leaf (1 MiB) plus a manifest
        # 1% of a 64 MiB array changed in one place: about one chunk is written, not the array
        big = rng.random(16 * 2**20 // 2, dtype=np.float32)  # 32 MiB
        c.update({"big": big}, wait="committed")
        before = c.status()["bytes_written"]
        big = big.copy()
        big[1000 : 1000 + len(big) // 100] = 0.0
        c.update({"big": big}, wait="committed")
        changed = c.status()["bytes_written"] - before
        assert changed <= 0.03 * (big.nbytes + 32 * 2**20), changed


def cli(d: PrivateDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOSAVED_ADDRESS": d.address, "AUTOSAVED_STATE_DIR": str(d.state_dir)}
    return subprocess.run([sys.executable, "-m", "autosaved", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_verify_reports_damage_online_and_offline(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    rng = np.random.default_rng(5)
    with autosaved.Client("v", address=d.address) as c:  # float data: stored raw, so the file is <digest>
        c.update({"a": rng.random(1000)}, wait="committed")
        c.update({"a": rng.random(2000)}, wait="committed")
    ok = cli(d, "verify", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert [(r["job"], [v["ok"] for v in r["versions"]]) for r in report] == [("v", [True, True])]
    chunk = first_chunk(d.state_dir, "v")
    raw = bytearray(chunk.read_bytes())
    raw[8] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    bad = cli(d, "verify", "v")
    assert bad.returncode == 1 and "DAMAGED" in bad.stdout and "v v2" in bad.stderr
    d.stop()
    offline = cli(d, "verify", "--json")
    assert offline.returncode == 1 and "not reachable" in offline.stderr
    assert [v["ok"] for v in json.loads(offline.stdout)[0]["versions"]] == [True, False]


def test_gc_removes_garbage_and_never_races_the_daemon(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY)
    with autosaved.Client("g", address=d.address, policy={"keep_last": 5}) as c:
        for i in range(4):
            c.update({"a": np.full(10_000, i)}, wait="committed")
    objects = d.state_dir / "jobs" / str(os.geteuid()) / "g" / "objects"
    stray = objects / "ff" / ("ff" * 32)  # what a save that crashed before its manifest leaves behind
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"x" * 5000)
    refused = cli(d, "gc", "--offline")
    assert refused.returncode == 2 and "already using state dir" in refused.stderr
    done = cli(d, "gc", "g", "--json")
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    # the live job keeps its client's keep_last = 5: only the stray chunk goes
    assert result["removed_chunks"] == 1 and result["freed_bytes"] == 5000 and result["deleted_versions"] == []
    assert not stray.exists()
    d.stop()
    # offline, the config's keep_last (default 3) applies: version 1, its chunk and its one page go
    offline = cli(d, "gc", "--offline", "--json")
    assert offline.returncode == 0, offline.stderr
    (result,) = json.loads(offline.stdout)
    assert result["deleted_versions"] == [1] and result["removed_chunks"] == 2
    assert (autosaved.restore("g", state_dir=d.state_dir)["a"] == 3).all()


def test_bench_incremental_reports_every_key() -> None:
    proc = subprocess.run([sys.executable, "-m", "autosaved", "bench", "incremental", "--size", "16MiB", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"bytes", "full_written_bytes", "full_save_s", "local_1pct_written_bytes",
                           "local_1pct_written_fraction", "local_1pct_save_s", "scattered_1pct_written_bytes",
                           "scattered_1pct_written_fraction", "scattered_1pct_save_s"}
    assert result["full_written_bytes"] >= result["bytes"]  # a first save writes everything
    # 16 leaves of 1 MiB, each one chunk (chunk_size 8 MiB): a change in one place rewrites that leaf's
    # chunk and the manifest only; a change everywhere rewrites every leaf. Dedup, not the host's speed.
    leaf = result["bytes"] // 16
    assert leaf <= result["local_1pct_written_bytes"] <= leaf + 64 * 1024, result
    assert result["scattered_1pct_written_bytes"] >= result["bytes"], result
    assert result["local_1pct_written_fraction"] == round(result["local_1pct_written_bytes"] / result["bytes"], 4)
