"""Wire records: what travels between the SDK and the daemon. No socket code lives here.

A request is a ZeroMQ multipart message ``[header, *blob_frames]``; the header is a msgpack map with
``v`` (protocol version), ``op``, ``seq`` and the op's fields. Binary leaves of the state travel as
their own frames, in the order of the tree's ``{"b": i}`` references, so big arrays are never copied
into the header. A reply is ``[header, *blob_frames]`` with ``ok: true`` and op results, or
``ok: false`` with a stable error ``code`` and a human ``message``.

Version 2 (issue 21) adds one node tag to a request's tree: ``{"B": <bin>}``, a bytes leaf of at most
:data:`INLINE_LEAF_MAX` bytes carried inside the header, so a small update (a LangGraph checkpoint: a few
serialised blobs of a few KiB) is one frame, with no blob descriptors to build and check. The daemon reads
versions 1 and 2 (a version 1 request may not use the tag); a daemon that speaks only version 1 answers a
version 2 request with ``bad_version``, which the SDK turns into an error that says to upgrade it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgpack

from .errors import AutosavedError, NotFound, ProtocolError, error_for_code
from .tree import MAX_DEPTH, Blob

PROTOCOL_VERSION: Final = 2
# Every version this daemon reads; it answers each request in the request's own version.
SUPPORTED_VERSIONS: Final = (1, 2)
# Version 2's inline bytes leaves: each at most this big, at most INLINE_TOTAL_MAX of them per request (the
# rest travel as frames, as in version 1, far below MAX_HEADER_BYTES). Bigger leaves are cheaper as frames
# (the daemon keeps a view of a frame, but copies a header's bin out of it).
INLINE_LEAF_MAX: Final = 64 * 1024
INLINE_TOTAL_MAX: Final = 1024 * 1024
MAX_HEADER_BYTES: Final = 16 * 1024 * 1024

AckLevel = Literal["accepted", "logged", "committed", "replicated"]
ACK_LEVELS: Final[tuple[AckLevel, ...]] = ("accepted", "logged", "committed", "replicated")
# The acks an update waits for a save to give (so its request is a long one).
SAVE_ACKS: Final[tuple[AckLevel, ...]] = ("committed", "replicated")


class Access(enum.Enum):
    """Who may call an op."""

    # Any peer the daemon accepted (the socket's mode and group already decided who may connect).
    ANY_PEER = "any peer"
    # Any peer, on its own jobs; root may name another owner (``owner`` in the header).
    JOB_OWNER = "the job's owner, or root"


@dataclass(frozen=True)
class OpSpec:
    """One op of the wire, as both sides read it: the client its timeout, the daemon who may call it
    (the daemon's handler for it is bound in :data:`autosaved.daemon.rpc.REGISTRY`)."""

    name: str
    access: Access
    # Whether the request may wait for a save or a scan of the disk, so the client gives it its
    # save_timeout: "always", "never", or "on_wait": when its ``wait`` asks for a save (SAVE_ACKS).
    long: Literal["always", "never", "on_wait"]


OP_TABLE: Final[Mapping[str, OpSpec]] = {spec.name: spec for spec in (
    OpSpec("ping", Access.ANY_PEER, "never"),
    # A hello may first load the job and replay its log (bounded by policy.log_bytes and replay_time, but a
    # just-restarted daemon may be loading several jobs at once): it must not time out meanwhile.
    OpSpec("hello", Access.JOB_OWNER, "always"),
    OpSpec("update", Access.JOB_OWNER, "on_wait"),
    OpSpec("save", Access.JOB_OWNER, "always"),
    OpSpec("restore", Access.JOB_OWNER, "always"),
    OpSpec("status", Access.JOB_OWNER, "never"),
    OpSpec("list", Access.JOB_OWNER, "never"),
    OpSpec("verify", Access.JOB_OWNER, "always"),
    OpSpec("gc", Access.JOB_OWNER, "always"),
    OpSpec("delete", Access.JOB_OWNER, "always"),
)}
OPS: Final = frozenset(OP_TABLE)


def is_long(op: str, header: Mapping[str, Any]) -> bool:
    """Whether a request may wait for a save or a disk scan (the client then uses its save_timeout)."""
    long = OP_TABLE[op].long
    return long == "always" or (long == "on_wait" and header.get("wait") in SAVE_ACKS)


def pack_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)  # type: ignore[no-any-return]


def unpack_header(raw: bytes | memoryview) -> dict[str, Any]:
    """Decode a header frame; ``ProtocolError`` for anything that is not a sane msgpack map."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes is over the {MAX_HEADER_BYTES} byte limit")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False, max_bin_len=MAX_HEADER_BYTES)
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    return header


def check_request(header: dict[str, Any]) -> tuple[str, int]:
    """Check the fields every request has; returns (op, seq)."""
    version = header.get("v")
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            f"protocol version {version!r} is not supported (this daemon speaks versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); use an SDK and a daemon of the same autosaved release",
            details={"code": "bad_version"},
        )
    op = header.get("op")
    if not isinstance(op, str) or op not in OPS:  # a map or list op is unhashable: found by fuzzing
        raise ProtocolError(f"unknown op {op!r}", details={"code": "unknown_op"})
    seq = header.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ProtocolError("request has no integer seq")
    return op, seq


def validate_path(path: Any) -> tuple[str | int, ...]:
    """A restore path: the keys (str or int) from the root down to one subtree; ``()`` is the root."""
    if path is None:
        return ()
    if not isinstance(path, (list, tuple)) or len(path) > MAX_DEPTH:
        raise ProtocolError(f"path must be a list of at most {MAX_DEPTH} keys, not {path!r}")
    for key in path:
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise ProtocolError(f"path keys must be str or int, not {type(key).__name__} ({key!r})")
    return tuple(path)


def blob_descriptors(blobs: Sequence[Blob]) -> list[dict[str, Any]]:
    return [b.descriptor() for b in blobs]


def blobs_from_frames(descs: Any, frames: Sequence[memoryview],
                      placed: Mapping[int, memoryview] | None = None) -> list[Blob]:
    """Pair untrusted blob descriptors with the bytes that carry them: the views in ``placed`` (blob
    index → view into a shared-memory slot, at least as long as the blob) and, in order, the frames."""
    placed = placed or {}
    if descs is None:
        descs = []
    if not isinstance(descs, list) or len(descs) != len(frames) + len(placed):
        named = len(descs) if isinstance(descs, list) else "?"
        raise ProtocolError(f"message names {named} blobs but carries {len(frames)} frames "
                            f"and {len(placed)} shared-memory leaves")
    blobs = []
    inline = iter(frames)
    for i, desc in enumerate(descs):
        kind, dtype, shape, nbytes = Blob.check_descriptor(desc)
        if i in placed:
            data = placed[i][:nbytes]
            if data.nbytes != nbytes:
                raise ProtocolError(f"blob {i} of {nbytes} bytes runs past the end of its shared-memory slot")
        else:
            data = next(inline)
            if data.nbytes != nbytes:
                raise ProtocolError(f"blob frame has {data.nbytes} bytes, descriptor says {nbytes}")
        blobs.append(Blob(kind=kind, dtype=dtype, shape=shape, nbytes=nbytes, data=data))
    return blobs


def ok_reply(seq: int, boot: str, **fields: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "ok": True, "seq": seq, "boot": boot, **fields}


def error_reply(seq: int | None, boot: str, err: AutosavedError) -> dict[str, Any]:
    code = err.details.get("code", err.code) if isinstance(err, ProtocolError) else err.code
    details = {k: v for k, v in err.details.items() if k != "code"}
    return {"v": PROTOCOL_VERSION, "ok": False, "seq": seq, "boot": boot, "code": code,
            "message": err.message, "details": details}


def inline_allowed(header: Mapping[str, Any]) -> bool:
    """Whether a request (already through :func:`check_request`) may carry ``{"B": bin}`` leaves."""
    return bool(header.get("v", 1) >= 2)


def raise_for_reply(header: dict[str, Any]) -> None:
    if not header.get("ok"):
        code = str(header.get("code", "error"))
        message = str(header.get("message", "unknown error"))
        if code == "bad_version":
            # An older daemon says only which version it speaks: say what to do about it.
            message += (f" (this SDK speaks protocol version {PROTOCOL_VERSION}: upgrade the daemon, or use the SDK "
                        "of the daemon's release)")
        raise error_for_code(code, message, header.get("details"))


def version_at_step(versions: Sequence[Mapping[str, Any]], step: int, job: str) -> int:
    """The newest verified version id whose ``step`` is ``step`` (rows as ``list`` gives them), for
    ``restore(step=N)`` everywhere: the SDK, the offline reader and the command line."""
    ids = [int(v["id"]) for v in versions if v.get("step") == step and v.get("ok", True)]
    if not ids:
        raise NotFound(f"job {job!r} has no verified version at step {step}")
    return max(ids)
