"""The LangGraph checkpointer: LangGraph's own conformance suite, a SIGKILLed graph run (agent and daemon)
resumed to the same final state and history, and many threads from many processes at once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import EXTENDED_CAPABILITIES

import autosaved
from autosaved.integrations.langgraph import AutosavedSaver
from autosaved.testing.private import PrivateDaemon
from tests.conftest import NO_AUTO_POLICY

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "langgraph_agent.py"


def test_conformance_base_and_every_extended_capability(daemon: PrivateDaemon) -> None:
    @checkpointer_test(name="AutosavedSaver")
    async def saver() -> AsyncIterator[AutosavedSaver]:
        s = AutosavedSaver(f"lg-{uuid.uuid4().hex[:8]}", address=daemon.address)
        yield s
        s.close()

    report = asyncio.run(validate(saver))
    report.print_report()
    assert report.passed_all_base()
    for cap in EXTENDED_CAPABILITIES:  # passed_all() would ignore one that is not detected: check each
        result = report.results[cap.value]
        assert result.detected and result.passed, (cap.value, result)


def _agent(address: str, thread: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(EXAMPLE), "--address", address, "--job", "agents", "--thread",
                             thread, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _finish(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines() if " " in line}
    return {"first": out.splitlines()[0], "final": json.loads(lines["final"]),
            "history": json.loads(lines["history"])}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_killed_graph_and_daemon_resume_to_the_same_state_and_history(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path, mode: str) -> None:
    # No automatic saves: what survives the daemon's SIGKILL is only what the write-ahead log holds.
    d = make_daemon(NO_AUTO_POLICY)
    flags = ["--history", "--effects", str(tmp_path / "effects")] + (["--async"] if mode == "async" else [])
    reference = _agent(d.address, "ref", *flags)
    killed = _agent(d.address, "x", *flags, "--block", "draft")
    assert killed.stdout is not None
    for line in killed.stdout:  # "blocked" comes once search's writes are acked by the daemon
        if line.startswith("blocked at draft"):
            break
    else:
        raise AssertionError(killed.stderr.read() if killed.stderr else "no output")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    ref = _finish(reference)
    d.kill()  # SIGKILL: nothing was ever saved as a version, so everything comes from the log
    d.start()
    resumed = _finish(_agent(d.address, "x", *flags))
    assert resumed["first"] == "resuming thread x"
    assert resumed["final"] == ref["final"]
    assert resumed["history"] == ref["history"]
    runs = (tmp_path / "effects").read_text().split("\n")
    # search finished before the kill and its writes were saved: it is not run again; draft is.
    assert runs.count("x search") == 1 and runs.count("x draft") == 2 and runs.count("x plan") == 1


def test_many_threads_from_many_processes_stay_isolated(daemon: PrivateDaemon) -> None:
    procs = {f"t{i}": _agent(daemon.address, f"t{i}", "--history", *(["--async"] if i % 2 else []))
             for i in range(3)}
    results = {t: _finish(p) for t, p in procs.items()}
    histories = [json.dumps(r["history"], sort_keys=True) for r in results.values()]
    assert len(set(histories)) == 1 and len(results["t0"]["history"]) == 6  # type: ignore[arg-type]
    with AutosavedSaver("agents", address=daemon.address) as saver:
        for t in results:
            assert {c.config["configurable"]["thread_id"] for c in saver.list({"configurable": {"thread_id": t}})} \
                == {t}
        saver.delete_thread("t1")
        assert saver.get_tuple({"configurable": {"thread_id": "t1"}}) is None
        assert saver.get_tuple({"configurable": {"thread_id": "t2"}}) is not None


def _put(saver: AutosavedSaver, thread: str, i: int, parent: str | None) -> str:
    cp = empty_checkpoint()
    cp["id"] = str(uuid6(clock_seq=-1))
    version = saver.get_next_version(None, None)
    cp["channel_values"] = {"messages": f"message {i} " * 20}
    cp["channel_versions"] = {"messages": version}
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": "",
                               **({"checkpoint_id": parent} if parent else {})}}
    return str(saver.put(config, cp, {"step": i, "source": "loop"}, {"messages": version})  # type: ignore[arg-type]
               ["configurable"]["checkpoint_id"])


def test_a_put_costs_the_checkpoint_not_the_history(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """The daemon counts each update's wire size into ``dirty_bytes`` (no saves with this policy): a put on
    a long thread sends as much as a put on a short one, and reading one checkpoint reads only it."""
    d = make_daemon(NO_AUTO_POLICY)
    with AutosavedSaver("scale", address=d.address) as saver, autosaved.Client("scale", address=d.address) as c:
        parent = None
        sizes = {}
        for i in range(400):
            before = c.status()["dirty_bytes"] if i in (5, 399) else None
            parent = _put(saver, "long", i, parent)
            if before is not None:
                sizes[i] = c.status()["dirty_bytes"] - before
        assert sizes[399] < sizes[5] * 1.2, sizes  # the same shape of checkpoint: the same bytes
        tup = saver.get_tuple({"configurable": {"thread_id": "long"}})
        assert tup is not None and tup.metadata["step"] == 399
        assert tup.checkpoint["channel_values"]["messages"] == "message 399 " * 20
        assert [t.metadata["step"] for t in saver.list({"configurable": {"thread_id": "long"}}, limit=3)] \
            == [399, 398, 397]


def test_unstorable_state_gets_a_clear_error(daemon: PrivateDaemon) -> None:
    with AutosavedSaver("bad", address=daemon.address) as saver:
        cp = empty_checkpoint()
        cp["channel_values"] = {"x": object()}
        cp["channel_versions"] = {"x": "1"}
        with pytest.raises(TypeError, match="object"):
            saver.put({"configurable": {"thread_id": "t", "checkpoint_ns": ""}}, cp, {}, {"x": "1"})
        with pytest.raises(ValueError, match="wait"):
            AutosavedSaver("bad", address=daemon.address, wait="soon")


def test_bench_langgraph_runs_every_saver_beside_its_peer() -> None:
    out = subprocess.run([sys.executable, "-m", "autosaved", "bench", "langgraph", "--puts", "20", "--rounds", "1",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    for api in ("aput", "put"):
        r = result[api]
        for saver in ("autosaved_logged", "autosaved_accepted", "sqlite_full", "sqlite_normal", "sqlite_default",
                      "memory"):
            assert r[saver]["p50_ms"] > 0 and r[saver]["p99_ms"] >= r[saver]["p50_ms"]
            assert r[saver]["puts_per_s"] > 0
        # like with like: each SQLite saver says what it ran with
        assert r["sqlite_full"]["synchronous"] == "FULL" and r["sqlite_normal"]["synchronous"] == "NORMAL"
        assert r["autosaved_logged_p50_vs_sqlite_full"] == round(
            r["autosaved_logged"]["p50_ms"] / r["sqlite_full"]["p50_ms"], 3)
        assert "autosaved_accepted_p50_vs_sqlite_default" in r
    assert result["puts"] == 20


def test_put_writes_after_put_is_one_request_and_the_first_write_still_wins(daemon: PrivateDaemon) -> None:
    """A graph step is put_writes on the checkpoint the saver just put: it knows that one has no writes yet,
    so the writes go in one request, without reading the checkpoint's writes first (perf, issue 21). A
    checkpoint it did not just create (another saver's, or an older one put again) is still read first, so
    LangGraph's "the first write of a (task, idx) wins" holds."""
    thread = {"thread_id": "w", "checkpoint_ns": ""}

    def counted(saver: AutosavedSaver) -> list[object]:
        restores: list[object] = []
        real = saver._client.restore
        saver._client.restore = lambda **kw: (restores.append(kw), real(**kw))[1]  # type: ignore[method-assign]
        return restores

    def put(saver: AutosavedSaver, cp: dict[str, object], parent: str | None) -> dict[str, object]:
        config = {"configurable": {**thread, **({"checkpoint_id": parent} if parent else {})}}
        return saver.put(config, cp, {"step": 1, "source": "loop"}, {})  # type: ignore[arg-type,return-value]

    cps = [empty_checkpoint(), empty_checkpoint()]
    for cp in cps:
        cp["id"] = str(uuid6(clock_seq=-1))
    with AutosavedSaver("writes", address=daemon.address) as saver:
        restores = counted(saver)
        first = put(saver, cps[0], None)
        restores.clear()
        saver.put_writes(first, [("ch", "first")], "task-1")  # type: ignore[arg-type]
        second = put(saver, cps[1], cps[0]["id"])
        saver.put_writes(second, [("ch", "a")], "task-2")  # type: ignore[arg-type]
        saver.put_writes(second, [("ch", "b")], "task-2")  # type: ignore[arg-type]  # the same (task, idx)
        assert restores == []
    with AutosavedSaver("writes", address=daemon.address) as other:  # knows nothing of these checkpoints
        restores = counted(other)
        put(other, cps[0], None)  # an older checkpoint put again: it has writes
        restores.clear()
        other.put_writes(first, [("ch", "second")], "task-1")  # type: ignore[arg-type]
        other.put_writes(second, [("ch", "c")], "task-2")  # type: ignore[arg-type]
        assert len(restores) == 2  # each read first
        for config, write in ((first, ("task-1", "ch", "first")), (second, ("task-2", "ch", "a"))):
            got = other.get_tuple(config)  # type: ignore[arg-type]
            assert got is not None and got.pending_writes == [write]


def test_a_graph_that_read_its_thread_puts_without_reading_latest_again(daemon: PrivateDaemon) -> None:
    """A graph run starts with get_tuple (which reads the thread's ``latest``) and then puts: the put uses
    what get_tuple saw instead of a second read (perf, issue 21), on an empty thread and on a long one."""
    with AutosavedSaver("seen", address=daemon.address) as writer:
        parent = _put(writer, "long", 0, None)
    with AutosavedSaver("seen", address=daemon.address) as saver:
        restores: list[object] = []
        real = saver._client.restore
        saver._client.restore = lambda **kw: (restores.append(kw), real(**kw))[1]  # type: ignore[method-assign]
        assert saver.get_tuple({"configurable": {"thread_id": "new"}}) is None
        assert saver.get_tuple({"configurable": {"thread_id": "long"}}) is not None
        restores.clear()
        _put(saver, "new", 0, None)
        newest = _put(saver, "long", 1, parent)
        assert restores == []
        got = saver.get_tuple({"configurable": {"thread_id": "long"}})
        assert got is not None and got.config["configurable"]["checkpoint_id"] == newest
        assert saver.get_tuple({"configurable": {"thread_id": "new"}}) is not None


def test_a_saver_remembers_a_bounded_number_of_threads_and_an_evicted_one_stays_right(
        daemon: PrivateDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread -> latest checkpoint cache is bounded (it grew with every thread a saver ever saw); a
    thread it forgot reads ``latest`` again, so an older checkpoint put there never moves it back."""
    import autosaved.integrations.langgraph as lg

    monkeypatch.setattr(lg, "_WRITTEN_CACHE", 4)
    with AutosavedSaver("bounded", address=daemon.address) as saver:
        first = _put(saver, "t0", 0, None)
        newest = _put(saver, "t0", 1, first)
        for i in range(1, 10):
            _put(saver, f"t{i}", 0, None)
        assert len(saver._latest) <= 4 and ("t0", "") not in saver._latest
        # An older checkpoint id put again on the forgotten thread: latest stays the newest one.
        older = empty_checkpoint()
        older["id"] = first
        saver.put({"configurable": {"thread_id": "t0", "checkpoint_ns": ""}}, older, {"step": 0}, {})
        got = saver.get_tuple({"configurable": {"thread_id": "t0"}})
        assert got is not None and got.config["configurable"]["checkpoint_id"] == newest
        assert len(saver._latest) <= 4


def test_get_tuple_of_the_checkpoint_the_saver_put_is_two_requests_and_never_stale(daemon: PrivateDaemon) -> None:
    """A get_tuple of the checkpoint this saver put last on the thread asks for its channel values beside its
    record (2 requests, not 3: perf, issue 21), and checks the record names those versions: a checkpoint
    another saver put again with other values reads right."""
    def counted(saver: AutosavedSaver) -> list[object]:
        restores: list[object] = []
        real = saver._client.restore
        saver._client.restore = lambda **kw: (restores.append(kw), real(**kw))[1]  # type: ignore[method-assign]
        return restores

    def put(saver: AutosavedSaver, cp_id: str, text: str) -> None:
        cp = empty_checkpoint()
        cp["id"] = cp_id
        version = saver.get_next_version(None, None)
        cp["channel_values"] = {"messages": text, "step": 1}
        cp["channel_versions"] = {"messages": version, "step": version}
        saver.put({"configurable": {"thread_id": "g", "checkpoint_ns": ""}}, cp, {"step": 1, "source": "loop"},
                  {"messages": version, "step": version})

    thread = {"configurable": {"thread_id": "g"}}
    cp_id = str(uuid6(clock_seq=-1))
    with AutosavedSaver("gets", address=daemon.address) as a, AutosavedSaver("gets", address=daemon.address) as b:
        put(a, cp_id, "from a")
        restores = counted(a)
        got = a.get_tuple(thread)  # type: ignore[arg-type]
        assert len(restores) == 2
        assert got is not None and got.checkpoint["channel_values"] == {"messages": "from a", "step": 1}
        cold = b.get_tuple(thread)  # type: ignore[arg-type]  # b never put it: 3 requests, the same tuple
        assert cold is not None and cold.checkpoint == got.checkpoint and cold.metadata == got.metadata
        put(b, cp_id, "from b")  # the same checkpoint id, put again by another saver with new versions
        restores.clear()
        again = a.get_tuple(thread)  # type: ignore[arg-type]
        assert again is not None and again.checkpoint["channel_values"] == {"messages": "from b", "step": 1}
        assert len(restores) == 3  # a's guess was wrong: read again
