"""A LangGraph checkpointer that keeps every thread in the autosaved daemon.

    from autosaved.integrations.langgraph import AutosavedSaver
    graph = builder.compile(checkpointer=AutosavedSaver("my-agent"))
    graph.invoke(inputs, {"configurable": {"thread_id": "t1"}}, durability="sync")

One autosaved job holds all the threads of a saver, laid out so that every LangGraph call reads only what
it names (with the SDK's partial restore, ``restore(path=...)`` / ``restore(paths=[...])``)::

    threads/<thread_id>/latest/<ns>            newest checkpoint id of that namespace
    threads/<thread_id>/cp/<ns>/<checkpoint_id> {"c": checkpoint (serde), "m": metadata, "p": parent, "r": run}
    threads/<thread_id>/w/<ns>/<checkpoint_id>  {"<task_id>|<idx>": [task_id, channel, type, value, path, idx]}
    threads/<thread_id>/v/<ns>/<channel>/<ver>  [type, value]   one blob per channel version, as LangGraph's
                                                                own savers keep them
    threads/<thread_id>/runs/<run_id>           1               runs seen on the thread
    runs/<run_id>/<thread_id>/<ns>/<cp_id>      1               index for delete_for_runs

Why a partial restore and not one job per thread: a thread is the unit LangGraph reads, but it grows
without bound (10,000 checkpoints is a normal long-lived agent), so "restore the thread's job" would make
``get_tuple`` cost the whole history again. A restore by path costs what it names: ``get_tuple`` reads one
checkpoint record, its writes and the channel versions it references (three small requests at most; two
when this saver put that checkpoint last on the thread), and
``list`` on a thread reads that thread's records and then only the values of the checkpoints it returns.
It also keeps one job per agent for the operator (``autosaved list/status/gc``), one set of retention and
quota rules, and avoids a job (and a write-ahead log and folder) per conversation. The partial restore is
part of the SDK and protocol for everyone (a rank's part, one stage of a pipeline).

Cost of a ``put``: one update that carries this checkpoint's record and the values of the channels in
``new_versions`` — never the history; the daemon merges it in memory, logs that delta alone (at
``wait="logged"``) and its content-addressed store writes only new chunks on a save. The first put on a
thread by a saver also reads the thread's ``latest`` pointer once (cached after). A ``put_writes`` is one
update too: the saver remembers which writes it stored (a new checkpoint it put has none), and reads a
checkpoint's writes only for one it has not seen.

Durability is the SDK's ``wait``: ``"logged"`` (default) returns once the delta is fsynced in the daemon's
write-ahead log, so it survives SIGKILL of this process and of the daemon; ``"accepted"`` returns once it
is in daemon memory. (LangGraph's ``durability=`` decides *when* the graph calls ``put``.)

Sync methods use :class:`autosaved.Client` (one per saver, guarded by a lock: LangGraph may call from
worker threads); async methods use :class:`autosaved.AsyncClient` natively (one per event loop). Both run
the same request plans, so the two paths cannot drift apart.

Known limits: ``put_writes`` keeps LangGraph's "first write of a (task, idx) wins" by remembering what this
saver wrote (and reading the checkpoint's writes on a miss); two processes writing the same checkpoint at
once are not coordinated. ``delete_for_runs`` leaves channel values no remaining checkpoint references
until the thread is pruned or deleted.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from ..client import AsyncClient, Client
from ..tree import DELETE

__all__ = ["AutosavedSaver"]

T = "threads"
_WRITTEN_CACHE = 4096  # checkpoints whose write keys a saver remembers (LRU), threads' last puts and latest
_MAX_GUESS = 4094  # value paths a get_tuple asks for beside the record and its writes (the protocol's 4096)

# A plan is a generator that yields requests and gets their results back: ("restore", paths) → list of
# subtrees, ("update", delta) → None. One plan serves the sync and the async driver.
Op = tuple[str, Any]
Plan = Generator[Op, Any, Any]


def _ids(config: RunnableConfig) -> tuple[str, str]:
    conf = config["configurable"]
    return str(conf["thread_id"]), str(conf.get("checkpoint_ns", ""))


def _paths_of(tid: str, ns: str, versions: dict[str, Any]) -> list[tuple[str, ...]]:
    """Where the values of a checkpoint's channel versions are."""
    return [(T, tid, "v", ns, str(ch), str(ver)) for ch, ver in versions.items()]


def _typed(value: Any) -> tuple[str, bytes]:
    kind, data = value
    return str(kind), bytes(data)


class AutosavedSaver(BaseCheckpointSaver[str]):
    """``job``: the autosaved job that holds this saver's threads; ``address``: the daemon (default: the
    discovered one); ``wait``: the SDK ack level a ``put``/``put_writes`` returns at (``"logged"`` survives a
    SIGKILL of the daemon; ``"accepted"`` is faster and survives only this process's death)."""

    def __init__(self, job: str = "langgraph", *, address: str | None = None, wait: str = "logged",
                 serde: SerializerProtocol | None = None, timeout: float = 30.0) -> None:
        super().__init__(serde=serde)
        if wait not in ("accepted", "logged", "committed"):
            raise ValueError(f"wait must be 'accepted', 'logged' or 'committed', not {wait!r}")
        self.job = job
        self.wait = wait
        self._client = Client(job, address=address, timeout=timeout)
        self.address = self._client.address
        self._timeout = timeout
        self._sync_lock = threading.Lock()
        self._connected = False
        self._aio: dict[int, tuple[asyncio.AbstractEventLoop, AsyncClient]] = {}
        # (thread, ns) -> its newest checkpoint id as this saver last saw it (None: none yet).
        # (bounded like the caches below: a saver serving many threads must not grow without end; a thread
        # evicted reads its ``latest`` again at its next put)
        self._latest: OrderedDict[tuple[str, str], str | None] = OrderedDict()
        self._written: OrderedDict[tuple[str, str, str], set[str]] = OrderedDict()
        # (thread, ns) -> (id, channel versions) of the checkpoint this saver put last there: a get_tuple of
        # it asks for its values along with its record (one request less), and checks they were the right ones.
        self._last_put: OrderedDict[tuple[str, str], tuple[str, dict[str, str]]] = OrderedDict()

    # -- drivers -----------------------------------------------------------------------------------

    def _run(self, plan: Plan) -> Any:
        with self._sync_lock:
            if not self._connected:
                # hello loads the job in the daemon, replaying its write-ahead log after a daemon restart.
                self._client.connect()
                self._connected = True
            result: Any = None
            try:
                while True:
                    kind, arg = plan.send(result)
                    if kind == "restore":
                        result = self._client.restore(paths=arg)
                    else:
                        self._client.update(arg, wait=self.wait)
                        result = None
            except StopIteration as stop:
                return stop.value

    async def _arun(self, plan: Plan) -> Any:
        client = await self._aclient()
        result: Any = None
        try:
            while True:
                kind, arg = plan.send(result)
                if kind == "restore":
                    result = await client.restore(paths=arg)
                else:
                    await client.update(arg, wait=self.wait)
                    result = None
        except StopIteration as stop:
            return stop.value

    async def _aclient(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        held = self._aio.get(id(loop))
        if held is not None and held[0] is loop:
            return held[1]
        client = AsyncClient(self.job, address=self.address, timeout=self._timeout)
        await client.connect()
        self._aio[id(loop)] = (loop, client)
        return client

    def close(self) -> None:
        self._client.close()
        for _, client in self._aio.values():
            client.close()
        self._aio.clear()

    def __enter__(self) -> AutosavedSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> AutosavedSaver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------------

    def _tuple(self, tid: str, ns: str, cid: str, rec: dict[str, Any], writes: dict[str, Any] | None,
               values: dict[str, Any]) -> CheckpointTuple:
        checkpoint = cast(Checkpoint, self.serde.loads_typed(_typed(rec["c"])))
        ordered = sorted((writes or {}).values(), key=lambda w: (w[4], w[0], w[5]))  # writes_sort_key
        parent = rec.get("p")
        return CheckpointTuple(
            config={"configurable": {"thread_id": tid, "checkpoint_ns": ns, "checkpoint_id": cid}},
            checkpoint={**checkpoint, "channel_values": values},
            metadata=cast(CheckpointMetadata, self.serde.loads_typed(_typed(rec["m"]))),
            parent_config=({"configurable": {"thread_id": tid, "checkpoint_ns": ns, "checkpoint_id": parent}}
                           if parent else None),
            pending_writes=[(w[0], w[1], self.serde.loads_typed((w[2], bytes(w[3])))) for w in ordered],
        )

    def _value_paths(self, tid: str, ns: str, rec: dict[str, Any]) -> list[tuple[str, ...]]:
        return _paths_of(tid, ns, self.serde.loads_typed(_typed(rec["c"]))["channel_versions"])

    def _values(self, paths: list[tuple[str, ...]], got: list[Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for path, blob in zip(paths, got, strict=True):
            if blob is None or blob[0] == "empty":
                continue
            values[path[4]] = self.serde.loads_typed(_typed(blob))
        return values

    def _plan_get(self, config: RunnableConfig) -> Plan:
        tid, ns = _ids(config)
        cid = get_checkpoint_id(config)
        if cid is None:
            (cid,) = yield ("restore", [(T, tid, "latest", ns)])
            self._saw_latest((tid, ns), cid)  # the graph's next put on the thread need not read it again
            if cid is None:
                return None
        last = self._last_put.get((tid, ns))
        guess = _paths_of(tid, ns, last[1]) if last is not None and last[0] == cid else []
        if len(guess) > _MAX_GUESS:
            guess = []
        rec, writes, *guessed = yield ("restore", [(T, tid, "cp", ns, cid), (T, tid, "w", ns, cid), *guess])
        if rec is None:
            return None
        paths = self._value_paths(tid, ns, rec)
        if guess and set(paths) == set(guess):  # the record names the versions this saver put
            paths, got = guess, guessed
        else:
            got = (yield ("restore", paths)) if paths else []
        return self._tuple(tid, ns, cid, rec, writes, self._values(paths, got))

    def _plan_list(self, config: RunnableConfig | None, filter: dict[str, Any] | None,
                   before: RunnableConfig | None, limit: int | None) -> Plan:
        # (thread, ns, cid, record, writes) of every candidate, then filtered, then values for the chosen.
        found: list[tuple[str, str, str, dict[str, Any], dict[str, Any] | None]] = []
        if config is not None:
            tid = str(config["configurable"]["thread_id"])
            want_ns = config["configurable"].get("checkpoint_ns")
            cps, ws = yield ("restore", [(T, tid, "cp"), (T, tid, "w")])
            threads = {tid: {"cp": cps or {}, "w": ws or {}}}
        else:
            want_ns = None
            (threads,) = yield ("restore", [(T,)])
            threads = threads or {}
        for tid, thread in threads.items():
            for ns, cps in (thread.get("cp") or {}).items():
                if want_ns is not None and ns != want_ns:
                    continue
                ws = (thread.get("w") or {}).get(ns) or {}
                found.extend((tid, ns, cid, rec, ws.get(cid)) for cid, rec in cps.items())
        found.sort(key=lambda f: f[2], reverse=True)  # newest first, as LangGraph's own savers
        want_cid = get_checkpoint_id(config) if config is not None else None
        before_cid = get_checkpoint_id(before) if before is not None else None
        chosen: list[tuple[str, str, str, dict[str, Any], dict[str, Any] | None]] = []
        for item in found:
            if limit is not None and len(chosen) >= limit:
                break
            tid, ns, cid, rec, _ = item
            if (want_cid and cid != want_cid) or (before_cid and cid >= before_cid):
                continue
            if filter:
                meta = self.serde.loads_typed(_typed(rec["m"]))
                if not all(meta.get(k) == v for k, v in filter.items()):
                    continue
            chosen.append(item)
        per_item = [self._value_paths(tid, ns, rec) for tid, ns, _, rec, _ in chosen]
        flat = [p for paths in per_item for p in paths]
        got: list[Any] = []
        for start in range(0, len(flat), 4096):  # the protocol's limit of paths per request
            got.extend((yield ("restore", flat[start:start + 4096])))
        out, at = [], 0
        for (tid, ns, cid, rec, writes), paths in zip(chosen, per_item, strict=True):
            out.append(self._tuple(tid, ns, cid, rec, writes, self._values(paths, got[at:at + len(paths)])))
            at += len(paths)
        return out

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return cast(CheckpointTuple | None, self._run(self._plan_get(config)))

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return cast(CheckpointTuple | None, await self._arun(self._plan_get(config)))

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None) -> Iterator[CheckpointTuple]:
        yield from self._run(self._plan_list(config, filter, before, limit))

    async def alist(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None) -> AsyncIterator[CheckpointTuple]:
        for item in await self._arun(self._plan_list(config, filter, before, limit)):
            yield item

    # -- writing -----------------------------------------------------------------------------------

    def _plan_put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                  new_versions: ChannelVersions) -> Plan:
        tid, ns = _ids(config)
        cid = checkpoint["id"]
        c = dict(checkpoint)
        values: dict[str, Any] = c.pop("channel_values")  # type: ignore[assignment]
        meta = get_checkpoint_metadata(config, metadata)
        run = meta.get("run_id")
        thread: dict[str, Any] = {
            "cp": {ns: {cid: {"c": list(self.serde.dumps_typed(c)), "m": list(self.serde.dumps_typed(meta)),
                              "p": config["configurable"].get("checkpoint_id"),
                              "r": str(run) if run is not None else None}}},
        }
        if new_versions:
            thread["v"] = {ns: {str(ch): {str(ver): list(self.serde.dumps_typed(values[ch]) if ch in values
                                                        else ("empty", b""))}
                                for ch, ver in new_versions.items()}}
        key = (tid, ns)
        if key not in self._latest:
            (known,) = yield ("restore", [(T, tid, "latest", ns)])
            self._saw_latest(key, known)
        newest = self._latest[key]
        if newest is None or cid > newest:
            thread["latest"] = {ns: cid}
        delta: dict[str, Any] = {T: {tid: thread}}
        if run is not None:
            thread["runs"] = {str(run): 1}
            delta["runs"] = {str(run): {tid: {ns: {cid: 1}}}}
        yield ("update", delta)
        if newest is None or cid > newest:
            self._set_latest(key, cid)
            # A checkpoint newer than the thread's latest is new: it has no writes yet (but what this saver
            # wrote for it before), so the graph's put_writes for it need not read them first: a round trip
            # less per step (perf, issue 21). Another process writing it at once is the known limit above.
            if (tid, ns, cid) not in self._written:
                self._remember_written((tid, ns, cid), set())
            self._last_put[key] = (cid, {str(ch): str(ver) for ch, ver in checkpoint["channel_versions"].items()})
            self._last_put.move_to_end(key)
            while len(self._last_put) > _WRITTEN_CACHE:
                self._last_put.popitem(last=False)
        return {"configurable": {"thread_id": tid, "checkpoint_ns": ns, "checkpoint_id": cid}}

    def _saw_latest(self, key: tuple[str, str], cid: str | None) -> None:
        known = self._latest.get(key)
        if key not in self._latest or (cid is not None and (known is None or cid > known)):
            self._set_latest(key, cid)

    def _set_latest(self, key: tuple[str, str], cid: str | None) -> None:
        self._latest[key] = cid
        self._latest.move_to_end(key)
        while len(self._latest) > _WRITTEN_CACHE:
            self._latest.popitem(last=False)

    def _remember_written(self, key: tuple[str, str, str], seen: set[str]) -> None:
        self._written[key] = seen
        self._written.move_to_end(key)
        while len(self._written) > _WRITTEN_CACHE:
            self._written.popitem(last=False)

    def _plan_put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                         task_path: str) -> Plan:
        tid, ns = _ids(config)
        cid = str(config["configurable"]["checkpoint_id"])
        key = (tid, ns, cid)
        seen = self._written.get(key)
        if seen is None:
            (stored,) = yield ("restore", [(T, tid, "w", ns, cid)])
            seen = set(stored or ())
        self._remember_written(key, seen)
        entries: dict[str, Any] = {}
        for idx, (channel, value) in enumerate(writes):
            at = WRITES_IDX_MAP.get(channel, idx)
            wkey = f"{task_id}|{at}"
            if at >= 0 and wkey in seen:  # a regular write is never replaced (LangGraph's rule)
                continue
            kind, data = self.serde.dumps_typed(value)
            entries[wkey] = [task_id, channel, kind, data, task_path, at]
        if entries:
            yield ("update", {T: {tid: {"w": {ns: {cid: entries}}}}})
            seen.update(entries)
        return None

    def put(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
            new_versions: ChannelVersions) -> RunnableConfig:
        return cast(RunnableConfig, self._run(self._plan_put(config, checkpoint, metadata, new_versions)))

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint, metadata: CheckpointMetadata,
                   new_versions: ChannelVersions) -> RunnableConfig:
        return cast(RunnableConfig, await self._arun(self._plan_put(config, checkpoint, metadata, new_versions)))

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                   task_path: str = "") -> None:
        self._run(self._plan_put_writes(config, writes, task_id, task_path))

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str,
                          task_path: str = "") -> None:
        await self._arun(self._plan_put_writes(config, writes, task_id, task_path))

    # -- deleting and copying ----------------------------------------------------------------------

    def _forget(self, tid: str) -> None:
        for key in [k for k in self._latest if k[0] == tid]:
            del self._latest[key]
        for wkey in [k for k in self._written if k[0] == tid]:
            del self._written[wkey]
        for pkey in [k for k in self._last_put if k[0] == tid]:
            del self._last_put[pkey]

    def _plan_delete_threads(self, thread_ids: Sequence[str]) -> Plan:
        tids = [str(t) for t in thread_ids]
        if not tids:
            return None
        runs = yield ("restore", [(T, tid, "runs") for tid in tids])
        delta: dict[str, Any] = {T: dict.fromkeys(tids, DELETE)}
        index: dict[str, Any] = {}
        for tid, seen in zip(tids, runs, strict=True):
            for run in seen or ():
                index.setdefault(run, {})[tid] = DELETE
        if index:
            delta["runs"] = index
        yield ("update", delta)
        for tid in tids:
            self._forget(tid)
        return None

    def _plan_delete_for_runs(self, run_ids: Sequence[str]) -> Plan:
        runs = [str(r) for r in run_ids]
        if not runs:
            return None
        indexes = yield ("restore", [("runs", r) for r in runs])
        doomed: dict[str, dict[str, set[str]]] = {}  # thread → ns → checkpoint ids
        for index in indexes:
            for tid, per_ns in (index or {}).items():
                for ns, cids in per_ns.items():
                    doomed.setdefault(tid, {}).setdefault(ns, set()).update(cids)
        if not doomed:
            return None
        tids = sorted(doomed)
        current = yield ("restore", [(T, tid, "cp") for tid in tids])
        threads: dict[str, Any] = {}
        for tid, cps in zip(tids, current, strict=True):
            thread: dict[str, Any] = {"runs": dict.fromkeys(runs, DELETE)}
            for ns, cids in doomed[tid].items():
                present = set((cps or {}).get(ns) or ())
                gone = cids & present
                if not gone:
                    continue
                thread.setdefault("cp", {})[ns] = dict.fromkeys(gone, DELETE)
                thread.setdefault("w", {})[ns] = dict.fromkeys(gone, DELETE)
                left = present - gone
                thread.setdefault("latest", {})[ns] = max(left) if left else DELETE
            threads[tid] = thread
        yield ("update", {T: threads, "runs": dict.fromkeys(runs, DELETE)})
        for tid in tids:
            self._forget(tid)
        return None

    def _plan_copy(self, source: str, target: str) -> Plan:
        src, dst = str(source), str(target)
        thread, dst_latest = yield ("restore", [(T, src), (T, dst, "latest")])
        if not thread:
            return None
        latest = dict(dst_latest or {})
        for ns, cid in (thread.get("latest") or {}).items():
            latest[ns] = max(cid, latest.get(ns, cid))
        copied = {**thread, "latest": latest}
        index: dict[str, Any] = {}
        for ns, cps in (thread.get("cp") or {}).items():
            for cid, rec in cps.items():
                if rec.get("r") is not None:
                    index.setdefault(rec["r"], {}).setdefault(dst, {}).setdefault(ns, {})[cid] = 1
        delta: dict[str, Any] = {T: {dst: copied}}
        if index:
            delta["runs"] = index
        yield ("update", delta)
        self._forget(dst)
        return None

    def _plan_prune(self, thread_ids: Sequence[str], strategy: str) -> Plan:
        if strategy == "delete":
            return (yield from self._plan_delete_threads(thread_ids))
        if strategy != "keep_latest":
            raise ValueError(f"prune strategy must be 'keep_latest' or 'delete', not {strategy!r}")
        tids = [str(t) for t in thread_ids]
        if not tids:
            return None
        threads = yield ("restore", [(T, tid) for tid in tids])
        delta: dict[str, Any] = {}
        runs_index: dict[str, Any] = {}
        for tid, thread in zip(tids, threads, strict=True):
            if not thread:
                continue
            out: dict[str, Any] = {}
            for ns, cps in (thread.get("cp") or {}).items():
                if not cps:
                    continue
                keep = max(cps)
                gone = [cid for cid in cps if cid != keep]
                if gone:
                    out.setdefault("cp", {})[ns] = dict.fromkeys(gone, DELETE)
                    out.setdefault("w", {})[ns] = {cid: DELETE for cid in gone if cid in (thread.get("w") or {})
                                                   .get(ns, {})}
                    for cid in gone:
                        run = cps[cid].get("r")
                        if run is not None:
                            runs_index.setdefault(run, {}).setdefault(tid, {}).setdefault(ns, {})[cid] = DELETE
                out.setdefault("latest", {})[ns] = keep
                # Channel values only the dropped checkpoints referenced go too.
                versions = self.serde.loads_typed(_typed(cps[keep]["c"]))["channel_versions"]
                wanted = {(str(ch), str(ver)) for ch, ver in versions.items()}
                stored = (thread.get("v") or {}).get(ns) or {}
                drop = {ch: {ver: DELETE for ver in vers if (ch, ver) not in wanted} for ch, vers in stored.items()}
                drop = {ch: vers for ch, vers in drop.items() if vers}
                if drop:
                    out.setdefault("v", {})[ns] = drop
            if out:
                delta[tid] = out
        if delta:
            full: dict[str, Any] = {T: delta}
            if runs_index:
                full["runs"] = runs_index
            yield ("update", full)
        for tid in tids:
            self._forget(tid)
        return None

    def delete_thread(self, thread_id: str) -> None:
        self._run(self._plan_delete_threads([thread_id]))

    async def adelete_thread(self, thread_id: str) -> None:
        await self._arun(self._plan_delete_threads([thread_id]))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._run(self._plan_delete_for_runs(run_ids))

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await self._arun(self._plan_delete_for_runs(run_ids))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._run(self._plan_copy(source_thread_id, target_thread_id))

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await self._arun(self._plan_copy(source_thread_id, target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._run(self._plan_prune(thread_ids, strategy))

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        await self._arun(self._plan_prune(thread_ids, strategy))

    def get_next_version(self, current: str | None, channel: None) -> str:
        """The scheme of LangGraph's own savers: a zero-padded counter (so versions compare as strings)
        and a random tail (so two forks of one channel never share a version)."""
        if current is None:
            current_v = 0
        elif isinstance(current, int):
            current_v = current
        else:
            current_v = int(current.split(".")[0])
        return f"{current_v + 1:032}.{random.random():016}"
