"""Power-loss states from a recorded trace, in the spirit of ALICE (OSDI '14) and CrashMonkey.

:mod:`.fstrace` records what the daemon did to the file system. This module turns that trace into
every state a POSIX file system may leave after a power cut, and checks each one.

The model. A cut after operation ``k`` keeps what was *durable* at that instant and any subset of what
was not:

- a data operation (``write``, ``trunc``) on a file is durable once that file was ``fsync``ed (or
  ``fdatasync``ed) after it;
- a directory-entry operation (``mkdir``, ``create``, ``rename``, ``unlink``, ``rmdir``) is durable once
  the directory that holds the (new) name was fsynced after it; a rename is atomic (both names change
  together), as every journalling file system makes it;
- every operation that is not durable may be kept or dropped, independently of the others. Un-synced
  directory entries: in every subset (all subsets up to :data:`EXHAUSTIVE` of them, else all-kept,
  all-dropped, each one alone dropped, each one alone kept, and random subsets). Un-synced file data,
  per file and per write within a file (the ``independent`` model): each write kept, lost, replaced by
  zeros (the file grew but its data never reached the disk) or torn at any sector boundary (its first
  ``k`` bytes kept, ``off + k`` a multiple of :data:`SECTOR`), each trunc kept or lost, so a later write
  may survive an earlier one that did not. A cut whose whole product of such fates has at most
  :data:`EXHAUSTIVE_STATES` members is enumerated in full; a larger one gets the old shared fates
  (below) for every entry subset, each write alone lost, zeroed, torn at its first, middle and last
  boundary, or alone kept, and ``samples`` random assignments with and without the entries, and
  ``samples`` random joint draws; the report prints how many cuts were enumerated and how many sampled,
  the sample size and the seed. The ``shared`` model is the checker before issue 19: all un-synced data
  of a state shares one fate (all kept, all dropped, all zeroed, or each file's last un-synced write torn
  in half); it is kept to compare the two.

An entry kept inside a directory whose own entry was dropped is gone with it; a kept ``rmdir`` takes
whatever the dropped unlinks left inside. Identical states (same names, same bytes) are checked once.

The checks, per state and per job of the workload: the offline :func:`autosaved.restore` must return
exactly a state the client had after some update ``m`` with ``m`` at least the newest ``logged`` or
``committed`` ack made before the cut (nothing acked lost, nothing half-visible); every version whose
manifest is visible must verify (a visible version that does not load is half-visible). On a sample of
states a fresh daemon is started as well: it must come up, serve the same answer to a client, stop
cleanly on SIGTERM, and leave a store the offline restore still reads the same way.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import random
import shutil
import signal
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fstrace import read_trace

ENTRY_OPS = frozenset({"mkdir", "create", "rename", "unlink", "rmdir"})
DATA_OPS = frozenset({"write", "trunc"})
# Up to this many un-synced entry operations at a cut, every subset is tried (2**EXHAUSTIVE states).
EXHAUSTIVE = 6
# A cut whose full product of fates (entries kept or dropped x each write kept, lost, zeroed or torn at each
# sector boundary) has at most this many members is enumerated in full; larger ones are sampled.
EXHAUSTIVE_STATES = 256
SECTOR = 512
MODELS = ("independent", "shared")
NEVER = 1 << 62

Node = tuple[str, int]  # ("f", inode id) or ("d", dir id)


@dataclass
class Op:
    i: int
    kind: str
    parent: int = -1          # dir whose entry changes (the destination dir of a rename)
    name: str = ""
    node: Node | None = None  # what is created, moved or removed
    src_parent: int = -1
    src_name: str = ""
    ino: int = -1
    off: int = 0
    data: bytes = b""
    size: int = 0
    dir: int = -1             # fsyncdir
    synced_at: int = NEVER    # index of the first later op that makes this one durable


@dataclass
class Trace:
    ops: list[Op]
    # (number of fs ops before the mark, mark record)
    marks: list[tuple[int, dict[str, Any]]]


class _Dir:  # the parser's namespace
    __slots__ = ("children", "id")

    def __init__(self, did: int) -> None:
        self.id = did
        self.children: dict[str, Node] = {}


def parse(path: str | Path) -> Trace:
    """Resolve the raw trace into operations on stable identities, and when each becomes durable."""
    dirs: dict[int, _Dir] = {0: _Dir(0)}
    inodes: dict[tuple[int, int], int] = {}
    next_dir, next_ino = 1, 0
    ops: list[Op] = []
    marks: list[tuple[int, dict[str, Any]]] = []

    def lookup(rel: str) -> tuple[_Dir | None, str]:
        parts = rel.split("/")
        d: _Dir | None = dirs[0]
        for part in parts[:-1]:
            assert d is not None
            node = d.children.get(part)
            d = dirs[node[1]] if node is not None and node[0] == "d" else None
            if d is None:
                break
        return d, parts[-1]

    def ino_of(key: list[int]) -> int:
        nonlocal next_ino
        k = (int(key[0]), int(key[1]))
        if k not in inodes:
            inodes[k] = next_ino
            next_ino += 1
        return inodes[k]

    for rec in read_trace(str(path)):
        kind = rec["op"]
        i = len(ops)
        if kind == "mark":
            marks.append((i, rec))
            continue
        if kind == "mkdir":
            parent, name = lookup(rec["path"])
            if parent is None:
                continue
            did = next_dir
            next_dir += 1
            dirs[did] = _Dir(did)
            parent.children[name] = ("d", did)
            ops.append(Op(i, kind, parent=parent.id, name=name, node=("d", did)))
        elif kind == "create":
            parent, name = lookup(rec["path"])
            k = (int(rec["ino"][0]), int(rec["ino"][1]))
            inodes[k] = next_ino
            next_ino += 1
            if parent is None:
                continue
            parent.children[name] = ("f", inodes[k])
            ops.append(Op(i, kind, parent=parent.id, name=name, node=("f", inodes[k])))
        elif kind == "rename":
            if rec["src"] is None or rec["dst"] is None:
                continue  # into or out of the recorded tree: not used by the storage code
            sp, sn = lookup(rec["src"])
            dp, dn = lookup(rec["dst"])
            if sp is None or dp is None or sn not in sp.children:
                continue
            node = sp.children.pop(sn)
            dp.children[dn] = node
            ops.append(Op(i, kind, parent=dp.id, name=dn, node=node, src_parent=sp.id, src_name=sn))
        elif kind in ("unlink", "rmdir"):
            parent, name = lookup(rec["path"])
            if parent is None or name not in parent.children:
                continue
            node = parent.children.pop(name)
            ops.append(Op(i, kind, parent=parent.id, name=name, node=node))
        elif kind == "write":
            ops.append(Op(i, kind, ino=ino_of(rec["ino"]), off=int(rec["off"]), data=bytes(rec["data"])))
        elif kind == "trunc":
            ops.append(Op(i, kind, ino=ino_of(rec["ino"]), size=int(rec["size"])))
        elif kind == "fsync":
            ops.append(Op(i, kind, ino=ino_of(rec["ino"])))
        elif kind == "fsyncdir":
            d, name = lookup(rec["path"] + "/x")
            if d is not None:
                ops.append(Op(i, kind, dir=d.id))
    # A mark's position is the number of operations recorded before it: a cut after k ops saw it iff pos <= k.
    # When does each op become durable: the first later fsync of its file or directory.
    next_dir_sync: dict[int, int] = {}
    next_ino_sync: dict[int, int] = {}
    for op in reversed(ops):
        if op.kind == "fsyncdir":
            next_dir_sync[op.dir] = op.i
        elif op.kind == "fsync":
            next_ino_sync[op.ino] = op.i
        elif op.kind in ENTRY_OPS:
            op.synced_at = next_dir_sync.get(op.parent, NEVER)
        elif op.kind in DATA_OPS:
            op.synced_at = next_ino_sync.get(op.ino, NEVER)
    return Trace(ops, marks)


# -- crash states ----------------------------------------------------------------------------------

FileSpec = tuple[int, tuple[tuple[int, str], ...]]  # inode, (op index, how applied) per data op


@dataclass(frozen=True)
class CrashState:
    cut: int
    dropped: tuple[int, ...]      # un-synced entry ops left out
    mode: str                     # what happened to un-synced file data
    files: tuple[tuple[str, FileSpec], ...]
    dirs: tuple[str, ...]

    def key(self) -> str:
        h = hashlib.sha256(repr((self.files, self.dirs)).encode())
        return h.hexdigest()


def _subsets(entries: list[int], rng: random.Random, samples: int, window: int | None) -> Iterator[frozenset[int]]:
    """Sets of un-synced entry ops to *drop*. Each op alone dropped and alone kept is tried for the
    ``window`` most recent ones (all with ``None``); older ones are covered by the random subsets, where
    each is dropped half the time, at every later cut."""
    if len(entries) <= EXHAUSTIVE:
        for r in range(len(entries) + 1):
            for combo in itertools.combinations(entries, r):
                yield frozenset(combo)
        return
    everything = frozenset(entries)
    yield frozenset()
    yield everything
    for e in entries if window is None else entries[-window:]:
        yield frozenset({e})
        yield everything - {e}
    for _ in range(samples):
        yield frozenset(e for e in entries if rng.random() < 0.5)


# How one un-synced data op reaches the disk: "w" whole, "d" not at all, "z" as zeros (the file grew but its
# data never arrived), "h" its first half (the shared model's torn write), "p<k>" its first k bytes where
# ``off + k`` is a sector boundary (a write torn at that boundary). A trunc is "w" (applied) or "d".
Plan = dict[int, str]


def _boundaries(op: Op) -> list[int]:
    """Where a write may tear: the prefix lengths that end on a sector boundary strictly inside it."""
    first = (op.off // SECTOR + 1) * SECTOR
    return [b - op.off for b in range(first, op.off + len(op.data), SECTOR)]


def _fates(op: Op) -> list[str]:
    """Every way ``op`` may reach the disk."""
    if op.kind == "trunc":
        return ["w", "d"]
    return ["w", "d", "z", *(f"p{k}" for k in _boundaries(op))]


def _shared_plans(data: list[Op]) -> Iterator[tuple[str, Plan]]:
    """The old model: one fate for all un-synced data (kept, dropped, zeroed, each file's last write torn)."""
    yield "keep", {}
    yield "drop", {op.i: "d" for op in data}
    yield "zero", {op.i: "z" for op in data if op.kind == "write"}
    last: dict[int, int] = {}
    for op in data:
        if op.kind == "write":
            last[op.ino] = op.i
    yield "torn", {i: "h" for i in last.values()}


def _random_plan(data: list[Op], rng: random.Random) -> Plan:
    plan: Plan = {}
    for op in data:
        fate = rng.choice(_fates(op)[:3] if op.kind == "write" else _fates(op))
        if op.kind == "write" and rng.random() < 0.25 and (cuts := _boundaries(op)):
            fate = f"p{rng.choice(cuts)}"
        if fate != "w":
            plan[op.i] = fate
    return plan


def _independent_plans(data: list[Op], rng: random.Random, samples: int,
                       window: int | None) -> Iterator[tuple[str, Plan]]:
    """Every file and every un-synced write within a file kept, lost or torn on its own: each op alone
    dropped, zeroed, torn (at its first, middle and last sector boundary) and alone kept with the rest
    lost, for the ``window`` most recent ops; then ``samples`` random assignments over all of them."""
    for op in data if window is None else data[-window:]:
        everything_lost = {o.i: "d" for o in data if o.i != op.i}
        yield f"only op {op.i} kept", everything_lost
        yield f"op {op.i} lost", {op.i: "d"}
        if op.kind == "write":
            yield f"op {op.i} zeroed", {op.i: "z"}
            cuts = _boundaries(op)
            for k in sorted({cuts[0], cuts[len(cuts) // 2], cuts[-1]} if cuts else set()):
                yield f"op {op.i} torn at +{k}", {op.i: f"p{k}"}
    for n in range(samples):
        yield f"random {n}", _random_plan(data, rng)


def _product_size(entries: int, data: list[Op], limit: int) -> int:
    """The size of the full product of fates (capped at ``limit + 1``: only whether it fits matters)."""
    total: int = 2**min(entries, 63)
    for op in data:
        total *= len(_fates(op))
        if total > limit:
            return limit + 1
    return total


def states_at(trace: Trace, cut: int, rng: random.Random, samples: int = 24,
              window: int | None = None, model: str = "independent",
              stats: dict[str, int] | None = None) -> Iterator[CrashState]:
    """The crash states of a cut after ``cut`` operations. ``model="shared"`` is the old model (all
    un-synced data shares one fate); ``"independent"`` (the default) lets every un-synced write and every
    un-synced entry keep, lose or tear on its own: the full product where it has at most
    :data:`EXHAUSTIVE_STATES` members, else the shared plans, each op alone perturbed and random joint
    samples. ``stats`` counts the cuts enumerated in full and sampled."""
    ops = trace.ops[:cut]
    entries = [op.i for op in ops if op.kind in ENTRY_OPS and op.synced_at >= cut]
    data = [op for op in ops if op.kind in DATA_OPS and op.synced_at >= cut]
    if model == "independent" and _product_size(len(entries), data, EXHAUSTIVE_STATES) <= EXHAUSTIVE_STATES:
        if stats is not None:
            stats["full"] = stats.get("full", 0) + 1
        for r in range(len(entries) + 1):
            for combo in itertools.combinations(entries, r):
                for fates in itertools.product(*(_fates(op) for op in data)):
                    plan = {op.i: f for op, f in zip(data, fates, strict=True) if f != "w"}
                    yield _materialise(ops, cut, frozenset(combo), plan, "product")
        return
    if stats is not None:
        stats["sampled"] = stats.get("sampled", 0) + 1
    shared = list(_shared_plans(data)) if data else [("keep", {})]
    for dropped in _subsets(entries, rng, samples, window):
        for label, plan in shared:
            yield _materialise(ops, cut, dropped, plan, label)
    if model == "shared" or not data:
        return
    everything = frozenset(entries)
    for label, plan in _independent_plans(data, rng, samples, window):
        yield _materialise(ops, cut, frozenset(), plan, label)
        if everything:
            yield _materialise(ops, cut, everything, plan, label)
    for n in range(samples):  # entries and data drawn together
        yield _materialise(ops, cut, frozenset(e for e in entries if rng.random() < 0.5), _random_plan(data, rng),
                           f"joint random {n}")


def _materialise(ops: list[Op], cut: int, dropped: frozenset[int], plan: Plan, mode: str) -> CrashState:
    # Plain dicts and local names: this loop runs once per generated state over every op before the cut.
    dirs: dict[int, dict[str, Node]] = {0: {}}
    where: dict[int, tuple[int, str]] = {}  # dir id -> (parent id, name) in this state
    specs: dict[int, list[tuple[int, str]]] = {}
    for op in ops:
        kind = op.kind
        if kind == "fsync" or kind == "fsyncdir":
            continue
        if kind == "write" or kind == "trunc":
            how = "w" if op.synced_at < cut else plan.get(op.i, "w")
            if how == "d":
                continue
            specs.setdefault(op.ino, []).append((op.i, how if kind == "write" else "t"))
            continue
        if op.i in dropped:
            continue
        parent = dirs.get(op.parent)
        node = op.node
        assert node is not None
        if kind == "create":
            if parent is not None:
                parent[op.name] = node
        elif kind == "mkdir":
            if parent is not None:
                dirs[node[1]] = {}
                parent[op.name] = node
                where[node[1]] = (op.parent, op.name)
        elif kind == "rename":
            if node[0] == "d" and node[1] not in dirs:
                continue  # the directory itself never became visible
            src = dirs.get(op.src_parent)
            if src is not None and src.get(op.src_name) == node:
                del src[op.src_name]
            elif node[0] == "d" and node[1] in where:
                pid, pname = where[node[1]]
                if pid in dirs and dirs[pid].get(pname) == node:
                    del dirs[pid][pname]
            if parent is not None:
                parent[op.name] = node
                if node[0] == "d":
                    where[node[1]] = (op.parent, op.name)
        elif parent is not None and parent.get(op.name) == node:
            # unlink, rmdir: a kept rmdir removes whatever dropped unlinks left inside
            del parent[op.name]
    files: list[tuple[str, FileSpec]] = []
    dir_paths: list[str] = []
    stack: list[tuple[int, str]] = [(0, "")]
    seen: set[int] = {0}
    while stack:
        did, prefix = stack.pop()
        for name, node in sorted(dirs[did].items()):
            path = prefix + name
            if node[0] == "f":
                files.append((path, (node[1], tuple(specs.get(node[1], ())))))
            elif node[1] in dirs and node[1] not in seen:
                seen.add(node[1])
                dir_paths.append(path)
                stack.append((node[1], path + "/"))
    files.sort()
    dir_paths.sort()
    return CrashState(cut, tuple(sorted(dropped)), mode, tuple(files), tuple(dir_paths))


class Materialiser:
    """Writes crash states to disk. File contents are built once and hard-linked into each state."""

    def __init__(self, trace: Trace, work: Path) -> None:
        self.by_index = {op.i: op for op in trace.ops}
        self.cache_dir = work / "contents"
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cache: dict[FileSpec, Path] = {}

    def content(self, spec: FileSpec) -> Path:
        path = self.cache.get(spec)
        if path is None:
            buf = bytearray()
            for idx, how in spec[1]:
                op = self.by_index[idx]
                if how == "t":
                    del buf[op.size:]
                    buf.extend(bytes(op.size - len(buf)))
                    continue
                data = op.data
                if how == "h":
                    data = data[: len(data) // 2]
                elif how.startswith("p"):
                    data = data[: int(how[1:])]
                elif how == "z":
                    data = bytes(len(data))
                if len(buf) < op.off:
                    buf.extend(bytes(op.off - len(buf)))
                buf[op.off : op.off + len(data)] = data
            path = self.cache_dir / f"{len(self.cache)}"
            path.write_bytes(bytes(buf))
            self.cache[spec] = path
        return path

    def write(self, state: CrashState, root: Path, *, copy: bool = False) -> None:
        """Lay ``state`` out under ``root`` (the state dir). ``copy`` for a daemon, which may write."""
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True, mode=0o700)
        for d in state.dirs:
            (root / d).mkdir(mode=0o750)
        for path, spec in state.files:
            src = self.content(spec)
            if copy:
                shutil.copyfile(src, root / path)
            else:
                os.link(src, root / path)


# -- what the workload promised --------------------------------------------------------------------

def canon(value: Any) -> Any:
    """A comparable form of a state tree (arrays by dtype, shape and bytes; tuples stay tuples)."""
    if isinstance(value, Mapping):
        return ("map", tuple(sorted(((type(k).__name__, k), canon(v)) for k, v in value.items())))
    if isinstance(value, tuple):
        return ("tuple", tuple(canon(v) for v in value))
    if isinstance(value, list):
        return ("list", tuple(canon(v) for v in value))
    if isinstance(value, np.ndarray):
        return ("nd", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def deep_merge(base: Any, delta: Mapping[Any, Any]) -> dict[Any, Any]:
    from ..tree import DELETE

    out = dict(base) if isinstance(base, Mapping) else {}
    for k, v in delta.items():
        if v is DELETE:
            out.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        elif isinstance(v, Mapping):
            out[k] = deep_merge({}, v)
        else:
            out[k] = v
    return out


@dataclass
class History:
    """The states a client had, per job, indexed by update number (0 = nothing; reset by a delete).

    A job written by several clients at once (``apply_concurrent``) is kept per client instead: its
    clients write disjoint keys, so its state is fixed by how many updates of each client it holds, and
    every such vector between the acked and the sent counts is a state the clients had."""

    states: dict[str, dict[int, Any]] = field(default_factory=dict)
    current: dict[str, Any] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    concurrent: dict[str, dict[str, list[Mapping[Any, Any]]]] = field(default_factory=dict)

    def apply_concurrent(self, job: str, client: str, delta: Mapping[Any, Any]) -> int:
        """Record ``client``'s next update of ``job`` (its keys no other client writes); its number."""
        deltas = self.concurrent.setdefault(job, {}).setdefault(client, [])
        deltas.append(delta)
        return len(deltas)

    def concurrent_states(self, job: str, low: dict[str, int], high: dict[str, int]) -> set[Any]:
        """Every state with each client's count between ``low`` and ``high`` (inclusive)."""
        clients = sorted(self.concurrent.get(job, {}))
        out: set[Any] = set()
        for counts in itertools.product(*(range(low.get(c, 0), high.get(c, 0) + 1) for c in clients)):
            state: dict[Any, Any] = {}
            for c, k in zip(clients, counts, strict=True):
                for delta in self.concurrent[job][c][:k]:
                    state = deep_merge(state, delta)
            out.add(canon(state))
        return out

    def apply(self, job: str, delta: Mapping[Any, Any]) -> int:
        n = self.n.get(job, 0) + 1
        self.n[job] = n
        self.current[job] = deep_merge(self.current.get(job, {}), delta)
        self.states.setdefault(job, {})[n] = canon(self.current[job])
        return n

    def deleted(self, job: str) -> None:
        self.current[job] = {}


def allowed_states(history: History, job: str, marks: list[dict[str, Any]]) -> tuple[set[Any], bool, int]:
    """What a restore of ``job`` may return given the marks before a cut: (canonical states, whether
    ``None`` is allowed, the acked floor)."""
    if job in history.concurrent:
        low: dict[str, int] = {}
        high: dict[str, int] = {}
        for m in marks:
            if m.get("job") == job and m["what"] == "update":
                book = high if m["ev"] == "sent" else low if m.get("level") in ("logged", "committed") else None
                if book is not None:
                    book[m["client"]] = max(book.get(m["client"], 0), int(m["n"]))
        allowed = history.concurrent_states(job, low, high)
        return allowed, not any(low.values()), sum(low.values())
    floor = 0
    none_ok = True
    sent = 0
    for m in marks:
        if m.get("job") != job:
            continue
        if m["ev"] == "sent" and m["what"] == "update":
            sent = max(sent, int(m["n"]))
        elif m["ev"] == "sent" and m["what"] == "delete":
            none_ok = True
        elif m["ev"] == "ack" and m["what"] in ("update", "save") and m.get("level") in ("logged", "committed"):
            floor = max(floor, int(m["n"]))
            none_ok = False
        elif m["ev"] == "ack" and m["what"] == "delete":
            floor = int(m["n"]) + 1  # nothing from before the delete may come back
            none_ok = True
    states = history.states.get(job, {})
    return {states[m] for m in range(max(floor, 1), sent + 1) if m in states}, none_ok, floor


@dataclass
class Finding:
    kind: str
    job: str
    state: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.job} @ {self.state}: {self.detail}"


def check_store(state_dir: Path, history: History, jobs: list[str], marks: list[dict[str, Any]],
                label: str, owner: int | None = None) -> list[Finding]:
    """The offline checks of one crash state."""
    from ..errors import CorruptVersion
    from ..offline import restore
    from ..storage.local import JobStore

    uid = os.geteuid() if owner is None else owner
    out: list[Finding] = []
    for job in jobs:
        allowed, none_ok, floor = allowed_states(history, job, marks)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = restore(job, state_dir=state_dir, owner=uid)
            except Exception as exc:
                out.append(Finding("restore-error", job, label, repr(exc)))
                continue
        for w in caught:
            out.append(Finding("half-visible", job, label, str(w.message)))
        out.extend(_judge(got, allowed, none_ok, floor, job, label))
        store = JobStore(state_dir, uid, job)
        try:
            infos = store.list_versions(verify=True)
        except CorruptVersion as exc:
            infos = []
            out.append(Finding("half-visible", job, label, str(exc)))
        for info in infos:
            if not info.ok:
                out.append(Finding("half-visible", job, label, f"version {info.id}: {info.error}"))
    return out


def _judge(got: Any, allowed: set[Any], none_ok: bool, floor: int, job: str, label: str) -> list[Finding]:
    if got is None:
        return [] if none_ok else [Finding("lost-ack", job, label, f"restore returned None; update {floor} was acked")]
    c = canon(got)
    if c in allowed:
        return []
    n = got.get("n") if isinstance(got, Mapping) else None
    if isinstance(n, int) and n < floor:
        return [Finding("lost-ack", job, label, f"restored update {n}; update {floor} was acked")]
    return [Finding("not-a-client-state", job, label, f"restored n={n!r} matches no state the client had "
                    f"at or after the acked update {floor}")]


def check_with_daemon(state_dir_src: Path, work: Path, history: History, jobs: list[str],
                      marks: list[dict[str, Any]], label: str, config: str) -> list[Finding]:
    """Start a fresh daemon on a copy of a crash state; it must serve what the offline check accepts."""
    from ..client.sync import Client
    from .private import PrivateDaemon

    root = work / "daemon"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    shutil.copytree(state_dir_src, root / "state", symlinks=True)
    out: list[Finding] = []
    env = {"AUTOSAVED_FSTRACE": "", "AUTOSAVED_FILEOPS": "", "AUTOSAVED_FAULTS_FILE": ""}
    d = PrivateDaemon(root, config=config, log_level="info", env=env)
    try:
        try:
            d.start(timeout=60)
        except Exception as exc:
            return [Finding("daemon-start", "*", label, str(exc)[-2000:])]
        for job in jobs:
            allowed, none_ok, floor = allowed_states(history, job, marks)
            c = Client(job, address=d.address, timeout=30, save_timeout=60)
            try:
                c.connect()  # a resuming trainer says hello first: the job is loaded and its log replayed
                got = c.restore()
            except Exception as exc:
                out.append(Finding("daemon-restore-error", job, label, repr(exc)))
                continue
            finally:
                c.close()
            out.extend(_judge(got, allowed, none_ok, floor, job, label + " (daemon)"))
        assert d.proc is not None
        if d.proc.poll() is not None:
            out.append(Finding("daemon-exit", "*", label, d.log()[-2000:]))
        rc = d.stop(signal.SIGTERM, timeout=60)
        if rc != 0:
            out.append(Finding("daemon-exit", "*", label, f"exit code {rc} on SIGTERM: {d.log()[-2000:]}"))
    finally:
        d.cleanup()
    # What the daemon left (it replays, repairs torn tails, flushes on stop) must still read the same.
    out.extend(check_store(root / "state", history, jobs, marks, label + " (after daemon)"))
    return out


def scratch_dir(fallback: Path) -> Path:
    """Where to lay crash states out: tmpfs when there is one (thousands of small trees; a disk-backed
    temp dir spends most of the run in rmdir), else ``fallback``."""
    import tempfile

    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="autosaved-crash-", dir=shm))
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


@dataclass
class Report:
    trace_ops: int = 0
    cuts: int = 0
    generated: int = 0
    checked: int = 0
    daemon_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    model: str = "independent"
    seed: int = 0
    samples: int = 0
    cuts_full: int = 0     # cuts whose full product of fates was enumerated
    cuts_sampled: int = 0  # cuts too large for that: sampled (``samples`` random plans and joint draws each)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out

    def summary(self) -> str:
        return (f"model {self.model}: trace ops {self.trace_ops}, cuts {self.cuts} ({self.cuts_full} enumerated in "
                f"full, {self.cuts_sampled} sampled: {self.samples} random plans per cut, seed {self.seed}), crash "
                f"states generated {self.generated}, distinct states checked offline {self.checked}, with a fresh "
                f"daemon {self.daemon_checked}, vulnerabilities {len(self.findings)} {self.kinds()}")


def explore(trace: Trace, history: History, jobs: list[str], work: Path, *, seed: int = 0, samples: int = 24,
            window: int | None = None, max_states: int | None = None, daemon_states: int = 0, daemon_config: str = "",
            stop_after: int | None = None, model: str = "independent") -> Report:
    """Generate and check every crash state of ``trace`` (distinct ones once). ``max_states`` caps the
    distinct states checked offline (spread over the cuts: every ``len/max``-th); ``daemon_states``
    of them, chosen at random, are also opened by a fresh daemon."""
    rng = random.Random(seed)
    report = Report(trace_ops=len(trace.ops), model=model, seed=seed, samples=samples)
    stats: dict[str, int] = {}
    # Torn log tails are expected in crash states; the storage code's warnings about them are noise here.
    logging.getLogger("autosaved").setLevel(logging.ERROR)
    mat = Materialiser(trace, work)
    seen: set[str] = set()
    unique: list[CrashState] = []
    for cut in range(len(trace.ops) + 1):
        report.cuts += 1
        for state in states_at(trace, cut, rng, samples, window, model, stats):
            report.generated += 1
            key = state.key()
            if key not in seen:
                seen.add(key)
                unique.append(state)
    report.cuts_full, report.cuts_sampled = stats.get("full", 0), stats.get("sampled", 0)
    chosen = unique
    if max_states is not None and len(unique) > max_states:
        step = len(unique) / max_states
        chosen = [unique[int(i * step)] for i in range(max_states)]
    daemon_pick = set(rng.sample(range(len(chosen)), min(daemon_states, len(chosen))))
    state_dir = work / "state"
    for idx, state in enumerate(chosen):
        marks = [m for pos, m in trace.marks if pos <= state.cut]
        label = f"cut {state.cut} drop {list(state.dropped)} data {state.mode}"
        mat.write(state, state_dir)
        found = check_store(state_dir, history, jobs, marks, label)
        report.checked += 1
        if idx in daemon_pick:
            mat.write(state, state_dir, copy=True)
            found += check_with_daemon(state_dir, work, history, jobs, marks, label, daemon_config)
            report.daemon_checked += 1
        report.findings.extend(found)
        if stop_after is not None and len(report.findings) >= stop_after:
            break
    return report
