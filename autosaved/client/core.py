"""The SDK's protocol core, with no I/O: every request is a *flow* the drivers run.

A flow is a generator that yields :data:`Step` records and receives each step's result (httpx's
"sans-I/O" pattern). :class:`Send` and :class:`Receive` are the ZeroMQ exchange; :class:`Local` is short
blocking work on the client's shared-memory pool (copying leaves into a slot, the fd socket, receiving a
restore's memfd), which the blocking :class:`~autosaved.client.sync.Client` runs inline and the
:class:`~autosaved.client.aio.AsyncClient` in a worker thread; :class:`LostState` asks the driver to run
the user's ``on_state_lost`` callback. So the decisions are written once, here: the ``slot_unknown``
retry, the ``StateLost`` retry, and when a restore comes through shared memory. The drivers only do I/O
(see :func:`drive` for the whole contract, and the unit tests that feed flows their replies by hand).

Restart detection: every reply carries the daemon's ``boot`` id. Each update also carries the boot id
the client last saw and the seq of its last acknowledged update; a daemon that started since, and whose
newest saved version does not cover that seq, refuses the update with ``state_lost`` instead of merging
it onto a state that misses earlier deltas. The client then raises :class:`~autosaved.errors.StateLost`
(or calls ``on_state_lost``) so the trainer can send its full state again. Never silence.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..codec import NotSmall, PinnedBuffers, TensorMode, encode, unpack
from ..config import PolicySettings
from ..errors import AutosavedError, InvalidValue, ProtocolError, StateLost
from ..names import validate_job_name
from ..protocol import (
    ACK_LEVELS,
    INLINE_LEAF_MAX,
    PROTOCOL_VERSION,
    blob_descriptors,
    blobs_from_frames,
    is_long,
    pack_header,
    raise_for_reply,
    unpack_header,
    validate_path,
    version_at_step,
)
from ..tree import DELETE, Blob, from_node
from .base import Ack, ack_from
from .slots import Placement, SlotPool

T = TypeVar("T")

# Moves the bulk blobs of an update into shared memory and says where (None: all inline).
Placer = Callable[[Sequence[Blob]], Placement | None]


@dataclass(frozen=True)
class Send:
    """Send ``frames`` to the daemon. Starts the request's deadline: ``long`` requests wait for a commit
    and get the driver's save timeout, the others its ordinary one. Result: ``None``."""

    frames: list[bytes | memoryview]
    op: str
    long: bool = False


@dataclass(frozen=True)
class Receive:
    """Wait for the next message from the daemon, until the deadline :class:`Send` started (on expiry
    the driver drops its socket and raises ``DaemonUnavailable``). Result: its frames."""


@dataclass(frozen=True)
class Local(Generic[T]):
    """Short blocking work on the shared-memory pool (a memcpy into a slot, the fd socket): run inline by
    the blocking driver, in a worker thread by the async one, never on an event loop. Result: ``run()``."""

    what: str
    run: Callable[[], T]


@dataclass(frozen=True)
class LostState:
    """The daemon lost acknowledged updates. Result: ``True`` once the driver has run the client's
    ``on_state_lost`` callback (the flow then resends), ``False`` when it has none (the flow raises)."""

    error: StateLost


Step = Send | Receive | Local[Any] | LostState
Flow = Generator[Step, Any, T]


def drive(flow: Flow[T], perform: Callable[[Step], Any]) -> T:
    """Run a flow to its result with ``perform`` doing each step: what a blocking driver does (the
    async one is the same loop with ``await``)."""
    try:
        step = next(flow)
        while True:
            step = flow.send(perform(step))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        flow.close()


@dataclass
class Request:
    op: str
    seq: int
    frames: list[bytes | memoryview]
    # protocol.is_long: the request may take as long as a save; the drivers use the longer timeout.
    long: bool = False


@dataclass
class Exported:
    """A job's state as stored: the tree with :class:`~autosaved.tree.Blob` leaves (raw bytes, dtypes and
    shapes, no numpy/torch values), and which version it is (``live``: the daemon's newest state,
    including updates not saved yet)."""

    tree: Any
    version: int | None
    step: int | None
    live: bool
    header: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Replaced:
    """What :meth:`AdminCore.replace` committed, and which top-level keys it removed."""

    ack: Ack
    removed: list[Any]


class Exchange:
    """Numbering and matching of requests, shared by the per-job and the admin cores."""

    def __init__(self, job: str, owner: int | None = None) -> None:
        self.job = job
        self.owner = owner  # act on another user's job (honoured for root only)
        self.seq = 0
        self.boot: str | None = None
        # (timeout, save_timeout) of the connection: each request then carries its deadline (``expires``),
        # and the daemon drops it unapplied if it waited past it (issue 19: never applied after the
        # client gave up on it).
        self.timeouts: tuple[float, float] | None = None

    def request(self, op: str, fields: dict[str, Any], blobs: list[memoryview] | None = None) -> Request:
        self.seq += 1
        long = is_long(op, fields)
        # The short fields first: the daemon reads a big header's leading fields without decoding it whole.
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "seq": self.seq, "job": self.job}
        if self.timeouts is not None:
            header["expires"] = time.time() + self.timeouts[1 if long else 0]
        header.update(fields)
        if self.owner is not None:
            header["owner"] = self.owner
        return Request(op=op, seq=self.seq, frames=[pack_header(header), *(blobs or [])], long=long)

    def matches(self, req: Request, frames: list[memoryview]) -> dict[str, Any] | None:
        """The reply header if ``frames`` answer ``req``; ``None`` for a stale reply to an earlier,
        timed-out request (those are dropped)."""
        try:
            header = unpack_header(frames[0])
        except Exception:
            return None
        return header if header.get("seq") == req.seq else None

    def exchange(self, req: Request) -> Flow[tuple[dict[str, Any], list[memoryview]]]:
        """Send ``req`` and receive until its reply comes (header, frames); does not check ``ok``."""
        yield Send(req.frames, req.op, req.long)
        while True:
            frames = yield Receive()
            header = self.matches(req, frames)
            if header is not None:
                return header, frames

    def call(self, req: Request) -> Flow[dict[str, Any]]:
        """A request whose result is its reply header; an error reply raises."""
        header, _ = yield from self.exchange(req)
        raise_for_reply(header)
        self._learn_boot(header)
        return header

    def _learn_boot(self, header: dict[str, Any]) -> None:
        self.boot = header.get("boot")

    def export_flow(self, req: Request, placed: Callable[[dict[str, Any]], Flow[dict[int, memoryview] | None]]
                    ) -> Flow[Exported | None]:
        header, frames = yield from self.exchange(req)
        leaves = yield from placed(header)
        raise_for_reply(header)
        self._learn_boot(header)
        if header.get("tree") is None:
            return None
        tree = from_node(header["tree"], blobs_from_frames(header.get("blobs"), frames[1:], leaves),
                         inline_max=INLINE_LEAF_MAX)
        return Exported(tree, header.get("version"), header.get("step"), bool(header.get("live")), header)


def _no_placed(header: dict[str, Any]) -> Flow[dict[int, memoryview] | None]:
    return None
    yield  # a generator: the flows compose with ``yield from``


class ClientCore(Exchange):
    """One job's session: what was acked and is durable, the pinned buffers, the shared-memory pool."""

    def __init__(self, job: str, *, policy: Mapping[str, Any] | None = None, slots: SlotPool | None = None,
                 owner: int | None = None) -> None:
        super().__init__(validate_job_name(job), owner)
        self.session = secrets.token_hex(8)
        # Validate overrides here, so a typo fails in the trainer, not as a daemon error later.
        PolicySettings.parse(policy or {}, where="policy")
        self.policy = dict(policy) if policy else None
        self.acked = 0
        self.durable = 0
        self.pinned: PinnedBuffers = {}
        self.slots = slots

    def _learn_boot(self, header: dict[str, Any]) -> None:
        """Take the replying daemon's boot id, unless it is a new daemon and this client has acked deltas
        not known durable: then the next update still carries the old boot id, so the daemon checks them
        (``state_lost``) instead of merging it onto a state that lost them. (A save, status or restore
        reply that taught the new boot hid the loss: found by the soak, issue 19.) An update's own reply
        always teaches it (that daemon did the check)."""
        boot = header.get("boot")
        if self.boot is None or boot == self.boot or self.acked <= self.durable:
            self.boot = boot

    # -- flows ---------------------------------------------------------------------------------

    def hello(self) -> Flow[dict[str, Any]]:
        header = yield from self._checked(self.request("hello", {"session": self.session, "policy": self.policy}))
        self.durable = int(header.get("durable") or 0)
        self.acked = max(self.acked, self.durable)
        return header

    def ping(self) -> Flow[dict[str, Any]]:
        return (yield from self.call(self.request("ping", {"job": None})))

    def status(self) -> Flow[dict[str, Any]]:
        # ``missing_ok``: before its first update the job does not exist yet (issue 22); the SDK then gets
        # the status of an empty job (``"exists": False``) with the policy it would run under.
        return (yield from self.call(self.request("status", {"missing_ok": True, "policy": self.policy})))

    def save(self) -> Flow[int]:
        before = self.boot
        header = yield from self.call(self.request("save", {}))
        if header.get("boot") == before:  # a restarted daemon's version holds only what it kept
            self.durable = self.acked
        return int(header["version"])

    def update(self, delta: Mapping[Any, Any], *, step: int | None = None, meta: Mapping[str, Any] | None = None,
               wait: str = "accepted", placer: Placer | None = None,
               before_resend: Callable[[], None] | None = None) -> Flow[Ack]:
        """Send an update; on ``state_lost`` let the driver run ``on_state_lost`` and send it once more.
        ``placer`` replaces the pool's own for the first send; ``before_resend`` runs (a :class:`Local`
        step) before any second send, which uses the pool's placer (the lazy client's hooks: its first
        copy signals the fence, and a resend must not read the caller's arrays again)."""
        try:
            return (yield from self._update_once(delta, step, meta, wait, placer, before_resend))
        except StateLost as lost:
            if not (yield LostState(lost)):
                raise
            if before_resend is not None:
                yield Local("before_resend", before_resend)
            return (yield from self._update_once(delta, step, meta, wait))

    def restore(self, version: int | None = None, tensors: TensorMode = "numpy",
                path: Sequence[str | int] | None = None,
                paths: Sequence[Sequence[str | int]] | None = None, step: int | None = None) -> Flow[Any]:
        """The newest state, or stored version ``version``, or the newest stored version at ``step``, as
        numpy/torch values (``None``: no state). ``path`` (keys from the root) asks for one subtree,
        ``paths`` for several (a list, in order; ``None`` for each that is missing): only their leaves are
        read and sent."""
        if path is not None and paths is not None:
            raise ValueError("restore takes path or paths, not both")
        if step is not None:
            if version is not None:
                raise ValueError("restore takes version or step, not both")
            if not isinstance(step, int) or isinstance(step, bool):
                raise ValueError(f"step must be an int, not {step!r}")
            header = yield from self.call(self.request("list", {}))
            version = version_at_step(header["versions"], step, self.job)
        wanted = [path] if path is not None else paths
        exported = yield from self.export(version, paths=wanted)
        if exported is None:  # no state at all: no subtree either
            return None if wanted is None or path is not None else [None] * len(wanted)
        value = unpack(exported.tree, tensors=tensors)
        return value[0] if path is not None else value

    def export(self, version: int | None = None,
               paths: Sequence[Sequence[str | int]] | None = None) -> Flow[Exported | None]:
        """Like :meth:`restore`, but the tree keeps its raw blob leaves (for the exchange format)."""
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise ValueError(f"version must be an int version id, not {version!r}")
        fields: dict[str, Any] = {"version": version}
        if paths is not None:
            try:
                fields["paths"] = [list(validate_path(p)) for p in paths]
            except ProtocolError as exc:
                raise ValueError(exc.message) from None
        # Naming our fd connection lets the daemon hand the bulk leaves over as a memfd.
        conn: str | None = None
        if self.slots is not None:
            known, conn = self.slots.known_restore_conn()
            if not known:  # the first restore connects: blocking I/O (later ones skip the hop to a thread)
                conn = yield Local("restore_conn", self.slots.restore_conn)
        req = self.request("restore", {**fields, "shm_conn": conn})
        return (yield from self.export_flow(req, self._placed))

    # -- the decisions inside the flows --------------------------------------------------------

    def _placed(self, header: dict[str, Any]) -> Flow[dict[int, memoryview] | None]:
        """The leaves a restore reply sent through shared memory (the memfd was sent before the reply)."""
        wire = header.get("shm")
        if not wire or self.slots is None:
            return None
        slots = self.slots
        placed: dict[int, memoryview] = yield Local("receive_restore", lambda: slots.receive(wire))
        return placed

    def _update_once(self, delta: Mapping[Any, Any], step: int | None, meta: Mapping[str, Any] | None,
                     wait: str, placer: Placer | None = None,
                     before_resend: Callable[[], None] | None = None) -> Flow[Ack]:
        req = yield from self._build_update(delta, step, meta, wait, placer)
        try:
            header = yield from self._checked(req)
        except AutosavedError as exc:
            if exc.code != "slot_unknown" or self.slots is None:
                raise
            if before_resend is not None:
                yield Local("before_resend", before_resend)
            # A new daemon does not know our slots: start a fresh pool and send once more.
            yield Local("reset_slots", self._fresh_slots)
            req = yield from self._build_update(delta, step, meta, wait)
            header = yield from self._checked(req)
        self.boot = header.get("boot")  # this daemon checked our acks against what it has
        self.acked = req.seq
        self.durable = int(header.get("durable") or 0)
        if header.get("ack") in ("logged", "committed", "replicated"):
            self.durable = req.seq
        if self.slots is not None:
            self.slots.settle(header.get("held"))
        return ack_from(header, req.seq)

    def _fresh_slots(self) -> None:
        assert self.slots is not None
        self.slots.reset()
        self.slots.retry_now()

    def _build_update(self, delta: Mapping[Any, Any], step: int | None, meta: Mapping[str, Any] | None,
                      wait: str, placer: Placer | None = None) -> Flow[Request]:
        slots = self.slots
        if placer is None:
            # A small delta (no arrays, tensors or big bytes: a LangGraph checkpoint) is built right here, on
            # the caller's thread or event loop: a hop to a worker thread cost an async update more than the
            # build itself (perf, issue 21). The walk gives up early on anything that needs blocking work.
            try:
                return self.update_request(delta, step=step, meta=meta, wait=wait, placer=None, small=True)
            except NotSmall:
                pass
            placer = slots.place if slots is not None else None
        # Packing and the copy into shared memory touch the whole state: blocking work, off the event loop.
        req: Request = yield Local("build_update", lambda: self.update_request(delta, step=step, meta=meta,
                                                                               wait=wait, placer=placer))
        return req

    def _checked(self, req: Request) -> Flow[dict[str, Any]]:
        """Like :meth:`call`, and learns from a ``state_lost`` refusal what this daemon has durable."""
        header, _ = yield from self.exchange(req)
        if header.get("code") == "state_lost":
            # We now know this daemon; what it has durable is all there is.
            self.boot = header.get("boot")
            self.durable = int((header.get("details") or {}).get("durable_seq", 0))
            self.acked = self.durable
        raise_for_reply(header)
        self._learn_boot(header)
        return header

    # -- request records -----------------------------------------------------------------------

    def update_request(self, delta: Mapping[Any, Any], *, step: int | None, meta: Mapping[str, Any] | None,
                       wait: str, placer: Placer | None = None, small: bool = False) -> Request:
        """The update's request: small bytes leaves inside the header (protocol 2), the rest as frames or in
        a shared-memory slot (``placer``). ``small``: raise :class:`~autosaved.codec.NotSmall` rather than
        do blocking work (see :meth:`_build_update`)."""
        if not isinstance(delta, Mapping):
            raise InvalidValue(f"update() takes a mapping, not {type(delta).__name__}")
        if wait not in ACK_LEVELS:
            raise ValueError(f"wait must be one of {', '.join(ACK_LEVELS)}, not {wait!r}")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise InvalidValue(f"step must be an int, not {type(step).__name__}")
        if meta is not None and not isinstance(meta, Mapping):
            raise InvalidValue(f"meta must be a mapping, not {type(meta).__name__}")
        node, blobs = encode(delta, allow_delete=True, pinned=self.pinned, inline=True, small=small)
        # Absent and None mean the same to the daemon: a field is sent only when it says something.
        fields: dict[str, Any] = {"session": self.session, "boot": self.boot, "acked": self.acked, "tree": node,
                                  "wait": wait}
        if blobs:
            fields["blobs"] = blob_descriptors(blobs)
        if step is not None:
            fields["step"] = step
        if meta is not None:
            fields["meta"] = dict(meta)
        if self.policy:
            fields["policy"] = self.policy
        if placer is not None:
            placement = placer(blobs)
        elif small and self.slots is not None:
            placement = self.slots.inline_placement()  # slots still lent: the reply says which came free
        else:
            placement = None
        placed: set[int] = set()
        if placement is not None:
            fields["shm"] = placement.to_wire()
            placed = {i for i, _ in placement.refs}
        data = [b.data for i, b in enumerate(blobs) if b.data is not None and i not in placed]
        return self.request("update", fields, data)


class AdminCore(Exchange):
    """Requests about the daemon and about any job (``owner``: another user's jobs, root only). No
    session, no shared memory: an admin never registers a job with the daemon."""

    def __init__(self, owner: int | None = None) -> None:
        super().__init__("_admin", owner)

    def _on(self, job: str | None) -> dict[str, Any]:
        return {"job": validate_job_name(job) if job is not None else None}

    def ping(self) -> Flow[dict[str, Any]]:
        return (yield from self.call(self.request("ping", {"job": None})))

    def status(self, job: str | None = None) -> Flow[dict[str, Any]]:
        fields = {"job": validate_job_name(job)} if job is not None else {"job": None}
        return (yield from self.call(self.request("status", fields)))

    def jobs(self) -> Flow[list[dict[str, Any]]]:
        header = yield from self.call(self.request("list", {"job": None}))
        rows: list[dict[str, Any]] = header["jobs"]
        return rows

    def versions(self, job: str) -> Flow[list[dict[str, Any]]]:
        header = yield from self.call(self.request("list", {"job": validate_job_name(job)}))
        rows: list[dict[str, Any]] = header["versions"]
        return rows

    def delete(self, job: str, *, dry_run: bool = False) -> Flow[dict[str, Any]]:
        fields: dict[str, Any] = {"job": validate_job_name(job), **({"dry_run": True} if dry_run else {})}
        header = yield from self.call(self.request("delete", fields))
        out = {"job": header["job"], "owner": header["owner"], "deleted_versions": header["deleted_versions"]}
        if dry_run:
            out.update(dry_run=True, freed_bytes=header["freed_bytes"], unsaved_bytes=header["unsaved_bytes"])
        if isinstance(header.get("remote"), dict):  # with [remote]: what happened to the bucket's copy
            out["remote"] = header["remote"]
        return out

    def maintain(self, op: str, job: str | None, *, dry_run: bool = False) -> Flow[list[dict[str, Any]]]:
        """``verify`` or ``gc`` of one job, or of every job with ``job=None``; may take a while. ``dry_run``
        (gc only): what would be deleted, deleting nothing."""
        if op not in ("verify", "gc"):
            raise ValueError(f"maintenance op must be verify or gc, not {op!r}")
        fields = {**self._on(job), **({"dry_run": True} if dry_run else {})}
        header = yield from self.call(self.request(op, fields))
        jobs: list[dict[str, Any]] = header["jobs"]
        return jobs

    def export(self, job: str, version: int | None = None) -> Flow[Exported | None]:
        """The job's newest state (``version=None``, unsaved updates included) or a stored version, with
        raw blob leaves; ``None`` when the job has no state."""
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise ValueError(f"version must be an int version id, not {version!r}")
        req = self.request("restore", {"job": validate_job_name(job), "version": version})
        return (yield from self.export_flow(req, _no_placed))

    def replace(self, core: ClientCore, state: Mapping[Any, Any], *, step: int | None,
                meta: Mapping[str, Any] | None) -> Flow[Replaced]:
        """Make ``core``'s job hold exactly ``state`` (top-level keys it has and ``state`` lacks are
        deleted) as a new committed version."""
        current = yield from self.export(core.job)
        have = current.tree if current is not None and isinstance(current.tree, Mapping) else {}
        stale = [k for k in have if k not in state]
        ack = yield from core.update({**state, **dict.fromkeys(stale, DELETE)}, step=step, meta=meta,
                                     wait="committed")
        return Replaced(ack, stale)
