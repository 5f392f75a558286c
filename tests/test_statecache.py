"""The state cache (issue 20 item 3): every job's tree within ``memory_limit``, the idle ones evicted to
their root and loaded back on their next request.

The eviction policy is pure and table-tested; the rest runs the real daemon with a small limit: many jobs
written and saved stay within it (the cache's accounted bytes, and the daemon's RSS roughly), an evicted
job restores exactly and merges its next update correctly, a dirty job is never evicted, and SIGKILL
after eviction loses nothing that was acknowledged.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import autosaved
from autosaved.client.admin import Admin
from autosaved.config import load_config
from autosaved.daemon.statecache import (
    AUTO_FLOOR,
    RESIDENT_PER_COST,
    Entry,
    memory_limit,
    plan_evictions,
    resident_estimate,
)
from autosaved.errors import ConfigError
from autosaved.protocol import pack_header, unpack_header
from autosaved.testing.private import PrivateDaemon
from autosaved.tree import to_node

from .conftest import NO_AUTO_POLICY

MiB = 1024**2


def _e(key: str, nbytes: int, last_used: float = 0.0, pinned: bool = False) -> Entry:
    return Entry(key, nbytes, last_used, pinned)


@pytest.mark.parametrize(("entries", "total", "limit", "now", "min_idle", "expected"), [
    # within the limit: nothing goes
    ([_e("a", 10), _e("b", 10)], 20, 20, 0.0, 0.0, []),
    # least recently used first (the order given), and only as many as needed
    ([_e("a", 10), _e("b", 10), _e("c", 10)], 30, 15, 0.0, 0.0, ["a", "b"]),
    ([_e("a", 10), _e("b", 10), _e("c", 10)], 30, 20, 0.0, 0.0, ["a"]),
    # pinned states (dirty, saving, in use) are skipped, never evicted
    ([_e("a", 10, pinned=True), _e("b", 10), _e("c", 10)], 30, 20, 0.0, 0.0, ["b"]),
    # pinned states alone over the limit: every unpinned one goes, the cache stays over
    ([_e("a", 50, pinned=True), _e("b", 10), _e("c", 10)], 70, 20, 0.0, 0.0, ["b", "c"]),
    # a state used less than min_idle ago stays, whatever its place
    ([_e("a", 10, last_used=9.5), _e("b", 10, last_used=1.0)], 20, 10, 10.0, 1.0, ["b"]),
    # one big state frees room for many
    ([_e("a", 100), _e("b", 1)], 101, 50, 0.0, 0.0, ["a"]),
])
def test_eviction_policy(entries: list[Entry], total: int, limit: int, now: float, min_idle: float,
                         expected: list[str]) -> None:
    assert plan_evictions(entries, total, limit, now, min_idle) == expected


def test_eviction_policy_reads_only_what_it_evicts_or_skips() -> None:
    """Per-request work: a pass stops at the first fit, so a lazy LRU order is read no further."""
    seen: list[str] = []

    def lazy() -> Any:
        for i in range(1_000_000):
            seen.append(str(i))
            yield _e(str(i), 10, pinned=i == 1)

    assert plan_evictions(lazy(), 100, 75, 0.0) == ["0", "2", "3"]
    assert len(seen) <= 5


def test_cache_in_process_keeps_the_newest_and_dirty_jobs_and_charges_owners() -> None:
    """The cache's bookkeeping on real Job records (no I/O: eviction only drops trees): least recently
    used clean jobs go, a dirty one stays, the most recently used one stays even when it alone is over
    the limit, and every owner's share in the ledger adds up to the cache's total."""
    from autosaved.daemon.accounting import Ledger
    from autosaved.daemon.jobs import Job
    from autosaved.daemon.statecache import StateCache
    from autosaved.state import counted

    ledger = Ledger()
    cache = StateCache(ledger, limit=lambda: 3000, clock=lambda: 0.0)

    def job(owner: int, name: str, n: int, *, dirty: bool = False) -> Job:
        j = Job(owner=owner, name=name, store=None, settings=None)  # type: ignore[arg-type]
        j.root = counted({"k": {str(i): "x" * 10 for i in range(n)}})
        j.latest_version, j.generation = 1, int(dirty)
        j.ledger = ledger
        ledger.attach(owner, j.root)
        j.cache = cache
        cache.add(j, loaded=True)
        return j

    dirty = job(1, "dirty", 20, dirty=True)
    a, b = job(1, "a", 20), job(2, "b", 20)
    # a went (the least recently used clean job); the dirty job and b (the newest) keep the cache over
    assert dirty.cache_bytes == b.cache_bytes > 0 and cache.total == 2 * b.cache_bytes > 3000
    assert (dirty.resident, a.resident, b.resident) == (True, False, True)  # a: the LRU clean one
    cost = a.root.cost
    assert a.cache_bytes == 0 and ledger.used(1) == dirty.root.cost + cost  # quota still counts a
    big = job(2, "big", 400)  # alone over the limit: the newest stays, b goes
    assert big.resident and big.cache_bytes > 3000 and not b.resident and dirty.resident
    assert ledger.cache_total == cache.total == sum(ledger.cache_bytes.values())
    assert ledger.cached_of(1) == dirty.cache_bytes and ledger.cached_of(2) == big.cache_bytes
    assert cache.status()["evictions"] == cache.status()["evicted_jobs"] == 2
    cache.remove(a)
    assert cache.status()["evicted_jobs"] == 1


def test_resident_estimate_and_limit() -> None:
    # leaves stored only in chunk files cost nothing resident; held bytes count once; the rest x factor
    assert resident_estimate(cost=1000 + 10**9, held=0, stored=10**9) == RESIDENT_PER_COST * 1000
    assert resident_estimate(cost=1000 + 4096, held=4096, stored=0) == 4096 + RESIDENT_PER_COST * 1000
    assert resident_estimate(cost=10, held=0, stored=50) == 0
    assert memory_limit(5 * MiB) == 5 * MiB
    assert memory_limit(None, total_memory=64 * 1024**3) == 8 * 1024**3
    assert memory_limit(None, total_memory=128 * MiB) == AUTO_FLOOR


def test_memory_limit_config(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text('memory_limit = "256MiB"\n')
    assert load_config(config_file=path).memory_limit == 256 * MiB
    path.write_text('memory_limit = "auto"\n')
    assert load_config(config_file=path).memory_limit is None
    path.write_text('memory_limit = "1KiB"\n')
    with pytest.raises(ConfigError, match="memory_limit"):
        load_config(config_file=path)


def state(i: int, n: int = 1500) -> dict[str, Any]:
    """About 150 KB encoded, about 900 KB as the cache counts it: many small maps (an agent's progress)."""
    return {"steps": {f"s{j}": {"stage": "reasoning", "out": f"job {i} step {j} " + "lorem " * 8, "n": j}
                      for j in range(n)},
            "w": np.full(16, i, dtype=np.int32), "step": i}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b) and np.asarray(a).dtype == np.asarray(b).dtype)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(type(a) is type(b) and a == b)


def daemon_status(d: PrivateDaemon) -> dict[str, Any]:
    with Admin(address=d.address) as admin:
        return admin.status()


def job_status(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(j for j in status["jobs"] if j["job"] == name)


def test_many_saved_jobs_stay_within_the_limit_and_come_back_exactly(
        make_daemon: Callable[..., PrivateDaemon], figure: Callable[[str], None]) -> None:
    limit = 2 * MiB
    d = make_daemon(f'memory_limit = "{limit}"\n' + NO_AUTO_POLICY)
    jobs = 30
    base_rss = daemon_status(d)["daemon"]["rss_bytes"]
    # A dirty job first (the least recently used of all): accepted, never saved (no policy fires).
    with autosaved.Client("dirty", address=d.address) as c:
        c.update(state(-1))
    for i in range(jobs):
        with autosaved.Client(f"j{i}", address=d.address) as c:
            c.update(state(i), wait="committed")
    s = daemon_status(d)
    cache = s["daemon"]["cache"]
    figure(f"state cache: {jobs} saved jobs of about {job_status(s, 'j0')['state_bytes']} encoded bytes each, "
           f"limit {limit}: {cache}; RSS {base_rss} -> {s['daemon']['rss_bytes']}")
    assert cache["limit"] == limit
    # The dirty job, the least recently used, stays (pinned); saved ones were evicted down to the limit.
    dirty = job_status(s, "dirty")
    assert dirty["dirty"] and dirty["resident"] and dirty["cache_bytes"] > 0
    assert cache["evictions"] >= jobs - 4 and cache["evicted_jobs"] == cache["evictions"]
    assert cache["bytes"] <= limit
    resident = [j for j in s["jobs"] if j["resident"]]
    assert sum(j["cache_bytes"] for j in resident) == cache["bytes"]
    assert all(j["cache_bytes"] == 0 for j in s["jobs"] if not j["resident"])
    # Quota bytes still count an evicted job's state (its stub root keeps the cost).
    assert all(j["state_bytes"] > 90_000 for j in s["jobs"])
    # RSS roughly: all 31 trees resident would take about 31 x 900 KB = 28 MB; the daemon grew by less than
    # 60% of that (the limit, allocator slack and one job in flight included: about 7 MB measured).
    all_resident = sum(j["state_bytes"] for j in s["jobs"]) * RESIDENT_PER_COST
    assert s["daemon"]["rss_bytes"] - base_rss < all_resident * 0.6, (base_rss, s["daemon"]["rss_bytes"])

    # Paths of an evicted (format-2) job are read from the pages on them, leaving it evicted, and give
    # what the live tree gives: None through a leaf or a missing key.
    paths = [("steps", "s3"), ("w", 0), ("steps", "nope"), ("step",), ("steps", "s9", "out")]
    with autosaved.Client("j5", address=d.address) as c:
        from_pages = c.restore(paths=paths)
        assert not c.status()["resident"]
        assert same(c.restore(), state(5))  # loaded back: now the live tree answers
        assert c.status()["resident"]
        live = c.restore(paths=paths)
    assert from_pages == live == [state(5)["steps"]["s3"], None, None, 5, state(5)["steps"]["s9"]["out"]]
    assert daemon_status(d)["daemon"]["cache"]["path_reads"] == cache["path_reads"] + 1

    # An evicted job restores exactly (loaded back), a path too, and merges its next update correctly.
    assert not job_status(s, "j0")["resident"]
    with autosaved.Client("j0", address=d.address) as c:
        assert same(c.restore(), state(0))
        assert c.restore(path=("steps", "s7", "n")) == 7
        ack = c.update({"steps": {"s1": {"n": -1}, "new": {"x": 1}}, "step": 100}, wait="committed")
        expected = state(0)
        expected["steps"]["s1"]["n"] = -1
        expected["steps"]["new"] = {"x": 1}
        expected["step"] = 100
        assert same(c.restore(), expected)
        # The version saved after the reload (diffed against the reloaded tree, storage/warm.py) is exact.
        assert ack.version is not None and same(c.restore(version=ack.version), expected)
    s = daemon_status(d)
    assert s["daemon"]["cache"]["loads"] > cache["loads"]
    assert job_status(s, "dirty")["resident"] and job_status(s, "j0")["resident"]  # dirty now: pinned
    # A job evicted and then updated with `accepted` only: the update applies after the reload, in order.
    with autosaved.Client("j1", address=d.address) as c:
        for k in range(5):
            c.update({"order": k})
        c.update({"steps": {"s0": autosaved.DELETE}}, wait="logged")
        got = c.restore()
        assert got["order"] == 4 and "s0" not in got["steps"] and len(got["steps"]) == 1499

    # SIGKILL: nothing acknowledged at `logged` or `committed` is lost, evicted or not.
    d.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=60)
    d.start()
    with autosaved.Client("j0", address=d.address) as c:
        assert same(c.restore(), expected)
    with autosaved.Client("j1", address=d.address) as c:
        got = c.restore()
        assert got["order"] == 4 and "s0" not in got["steps"]
    for i in range(2, jobs):
        with autosaved.Client(f"j{i}", address=d.address) as c:
            assert same(c.restore(), state(i)), i
    assert daemon_status(d)["daemon"]["cache"]["bytes"] <= limit


def test_status_of_an_evicted_job_does_not_load_it(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """``status`` reads counters: an evicted job stays evicted (and shows its state's size)."""
    d = make_daemon('memory_limit = "1MiB"\n' + NO_AUTO_POLICY)
    for i in range(4):
        with autosaved.Client(f"j{i}", address=d.address) as c:
            c.update(state(i), wait="committed")
    with autosaved.Client("j0", address=d.address) as c:
        st = c.status()
    assert not st["resident"] and st["cache_bytes"] == 0 and st["state_bytes"] > 90_000
    cache = daemon_status(d)["daemon"]["cache"]
    assert cache["bytes"] <= 1 * MiB and cache["evicted_jobs"] >= 3
    assert cache["loads"] == 0  # status loaded nothing back
    out = subprocess.run([sys.executable, "-m", "autosaved", "status", "--address", d.address],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert "state cache:" in out and f"{cache['evicted_jobs']} evicted" in out
    # Updates pipelined to an evicted job (sent back to back on one socket, no ack awaited) queue behind
    # its reload and apply in the order they were sent.
    assert not job_status(daemon_status(d), "j1")["resident"]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(d.address)
    try:
        for k in range(1, 21):
            node, _ = to_node({"order": k, f"k{k}": k})
            sock.send_multipart([pack_header({"v": 1, "op": "update", "job": "j1", "seq": k, "session": "pipe",
                                              "tree": node})])
        replies = []
        for _ in range(20):
            assert sock.poll(60_000), "no reply"
            replies.append(unpack_header(sock.recv_multipart()[0]))
    finally:
        sock.close(0)
    assert all(r.get("ack") == "accepted" for r in replies), replies
    generations = [r["generation"] for r in sorted(replies, key=lambda r: r["seq"])]
    assert generations == sorted(set(generations)), generations  # applied one by one, in seq order
    with autosaved.Client("j1", address=d.address) as c:
        got = c.restore()
    assert got["order"] == 20 and all(got[f"k{k}"] == k for k in range(1, 21))
    assert same(got["steps"], state(1)["steps"])
    # Deleting an evicted job takes its state's cost off its owner (the stub root carried it).
    before = daemon_status(d)["daemon"]
    with Admin(address=d.address) as admin:
        admin.delete("j0")
    after = daemon_status(d)["daemon"]
    assert after["cache"]["evicted_jobs"] == before["cache"]["evicted_jobs"] - 1
    assert after["state_bytes"] == before["state_bytes"] - st["state_bytes"]
    assert after["cache"]["bytes"] == before["cache"]["bytes"]


def test_cache_metrics_render() -> None:
    from autosaved.daemon.metrics import CacheSample, render

    from .test_metrics import _sample, values

    got = values(render(_sample(cache=CacheSample(nbytes=5, limit=9, hits=3, loads=2, evictions=1))))
    assert (got["autosaved_state_cache_bytes"], got["autosaved_state_cache_limit_bytes"]) == (5, 9)
    assert (got["autosaved_state_cache_hits_total"], got["autosaved_state_cache_loads_total"],
            got["autosaved_state_cache_evictions_total"]) == (3, 2, 1)
