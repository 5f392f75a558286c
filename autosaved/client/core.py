"""The SDK's protocol core, with no I/O: builds requests, reads replies, remembers what was acked.

:class:`~autosaved.client.sync.Client` and :class:`~autosaved.client.aio.AsyncClient` are thin drivers
around one ``ClientCore``: they only send the frames it builds and hand it the frames that come back.

Restart detection: every reply carries the daemon's ``boot`` id. Each update also carries the boot id
the client last saw and the seq of its last acknowledged update; a daemon that started since, and whose
newest saved version does not cover that seq, refuses the update with ``state_lost`` instead of merging
it onto a state that misses earlier deltas. The client then raises :class:`~autosaved.errors.StateLost`
(or calls ``on_state_lost``) so the trainer can send its full state again. Never silence.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..codec import PinnedBuffers, TensorMode, pack, unpack
from ..config import PolicySettings
from ..errors import InvalidValue
from ..protocol import (
    ACK_LEVELS,
    PROTOCOL_VERSION,
    blob_descriptors,
    blobs_from_frames,
    pack_header,
    raise_for_reply,
    unpack_header,
    validate_job_name,
)
from ..shm import Placement
from ..tree import Blob, from_node, to_node

# Moves the bulk blobs of an update into shared memory and says where (None: all inline).
Placer = Callable[[Sequence[Blob]], Placement | None]


@dataclass
class Request:
    op: str
    seq: int
    frames: list[bytes | memoryview]
    # Requests that wait for a commit may take as long as a save; the drivers use the longer timeout.
    long: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class ClientCore:
    def __init__(self, job: str, *, policy: Mapping[str, Any] | None = None) -> None:
        self.job = validate_job_name(job)
        self.session = secrets.token_hex(8)
        # Validate overrides here, so a typo fails in the trainer, not as a daemon error later.
        PolicySettings.parse(policy or {}, where="policy")
        self.policy = dict(policy) if policy else None
        self.seq = 0
        self.boot: str | None = None
        self.acked = 0
        self.durable = 0
        self.pinned: PinnedBuffers = {}

    def _request(self, op: str, fields: dict[str, Any], blobs: list[memoryview] | None = None,
                 long: bool = False) -> Request:
        self.seq += 1
        header = {"v": PROTOCOL_VERSION, "op": op, "seq": self.seq, "job": self.job, **fields}
        return Request(op=op, seq=self.seq, frames=[pack_header(header), *(blobs or [])], long=long)

    def hello(self) -> Request:
        return self._request("hello", {"session": self.session, "policy": self.policy})

    def update(self, delta: Mapping[Any, Any], *, step: int | None, meta: Mapping[str, Any] | None,
               wait: str, placer: Placer | None = None) -> Request:
        if not isinstance(delta, Mapping):
            raise InvalidValue(f"update() takes a mapping, not {type(delta).__name__}")
        if wait not in ACK_LEVELS:
            raise ValueError(f"wait must be one of {', '.join(ACK_LEVELS)}, not {wait!r}")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise InvalidValue(f"step must be an int, not {type(step).__name__}")
        if meta is not None and not isinstance(meta, Mapping):
            raise InvalidValue(f"meta must be a mapping, not {type(meta).__name__}")
        node, blobs = to_node(pack(delta, allow_delete=True, pinned=self.pinned), allow_delete=True)
        fields: dict[str, Any] = {
            "session": self.session, "boot": self.boot, "acked": self.acked, "tree": node,
            "blobs": blob_descriptors(blobs), "wait": wait, "step": step,
            "meta": dict(meta) if meta is not None else None,
        }
        if self.policy:
            fields["policy"] = self.policy
        placement = placer(blobs) if placer is not None else None
        placed: set[int] = set()
        if placement is not None:
            fields["shm"] = placement.to_wire()
            placed = {i for i, _ in placement.refs}
        data = [b.data for i, b in enumerate(blobs) if b.data is not None and i not in placed]
        return self._request("update", fields, data, long=wait in ("committed", "replicated"))

    def save(self) -> Request:
        return self._request("save", {}, long=True)

    def restore(self, version: int | None, shm_conn: str | None = None) -> Request:
        """``shm_conn`` names the client's fd connection, over which the daemon may send the bulk leaves."""
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise ValueError(f"version must be an int version id, not {version!r}")
        return self._request("restore", {"version": version, "shm_conn": shm_conn}, long=True)

    def ping(self) -> Request:
        return self._request("ping", {"job": None})

    def status(self, all_jobs: bool = False) -> Request:
        return self._request("status", {"job": None} if all_jobs else {})

    def list_jobs(self, job: str | None) -> Request:
        return self._request("list", {"job": job})

    def matches(self, req: Request, frames: list[memoryview]) -> dict[str, Any] | None:
        """The reply header if ``frames`` answer ``req``; ``None`` for a stale reply to an earlier,
        timed-out request (those are dropped)."""
        try:
            header = unpack_header(frames[0])
        except Exception:
            return None
        return header if header.get("seq") == req.seq else None

    def finish(self, req: Request, header: dict[str, Any], frames: list[memoryview],
               tensors: TensorMode = "numpy", placed: dict[int, memoryview] | None = None) -> Any:
        """Turn a reply into the call's result, or raise the error it carries. ``placed``: the leaves
        a restore reply sent through shared memory (see :meth:`SlotPool.receive`)."""
        if header.get("code") == "state_lost":
            # We now know this daemon; what it has durable is all there is.
            self.boot = header.get("boot")
            self.durable = int((header.get("details") or {}).get("durable_seq", 0))
            self.acked = self.durable
            raise_for_reply(header)
        raise_for_reply(header)
        self.boot = header.get("boot")
        if req.op == "hello":
            self.durable = int(header.get("durable") or 0)
            self.acked = max(self.acked, self.durable)
            return header
        if req.op == "update":
            self.acked = req.seq
            self.durable = int(header.get("durable") or 0)
            if header.get("ack") in ("logged", "committed", "replicated"):
                self.durable = req.seq
            return header
        if req.op == "save":
            self.durable = self.acked
            return header.get("version")
        if req.op == "restore":
            if header.get("tree") is None:
                return None
            blobs = blobs_from_frames(header.get("blobs"), frames[1:], placed)
            return unpack(from_node(header["tree"], blobs), tensors=tensors)
        return header

