"""Big requests decoded off the event loop (issue 19).

Measured (scripts/hostile_user.py --roles shapes, 2 cores): an update of 20,000 tiny maps (a 330 KB
header) took the event loop 0.3-0.6 s to unpack, decode and merge, most of it in CPython's cyclic garbage
collector, which ran dozens of times while the unpacker built 80,000 containers; a well-behaved user's
small update beside a stream of them had a p99 of 3.2 s (18 ms alone). Here such a request's header is
unpacked in slices of :data:`SLICE` bytes (msgpack's streaming unpacker resumes where it stopped, so no
C call holds the GIL for more than a slice), and its decode and merge plan run in a worker thread. The event
loop takes the GIL back within the interpreter's switch interval (:data:`SWITCH_INTERVAL`), however long
the worker runs. Most of the 0.3-0.6 s was CPython's automatic full collections over everything the daemon
held; those now run on the daemon's timer (gcpolicy.py). The collector was paused during a decode before
that; with full collections off, the pause only piled a decode's young objects into one long young
collection afterwards (265 collections over 5 ms in a 40 s run of the role, against 25 without it, and a
well-behaved p99 of 17 ms against 11 ms beside the role).

A request is big when its header frame is over :data:`OFFLOAD_MIN` bytes: blobs travel as frames of
their own and cost nothing to decode, so the header's size is what decoding costs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import msgpack

from ..errors import ProtocolError
from ..protocol import MAX_HEADER_BYTES
from ..storage.faults import point
from . import loopfirst
from .cpushare import CpuShares, Meter

T = TypeVar("T")

# Headers above this are decoded in a worker thread; below, inline (a 64 KiB header decodes in ~1 ms,
# and a thread hop costs ~50-100 us: small updates stay on the fast path of issue 14).
OFFLOAD_MIN = 64 * 1024
# Bytes fed to the unpacker per call: each call holds the GIL for about 0.1-0.5 ms.
SLICE = 16 * 1024
# The leading fields of a big header (v, op, seq, job: the SDK packs them first) are read from its first
# bytes only, to check and refuse the request at the edge without decoding it whole.
PEEK_BYTES = 4096
# How long a thread holding the GIL keeps it while another waits (CPython's default is 5 ms). Each send and
# receive of the rpc loop releases the GIL and may wait about this long to get it back from a busy worker
# (measured: a zmq round trip beside a decoding thread, 3.2 ms at 5 ms, 0.2-0.7 ms at 0.5 ms, load 19).
SWITCH_INTERVAL = 0.0002

# As unpackb's for a whole header (the streaming unpacker would derive them from its buffer size).
_LIMITS: dict[str, int] = {f"max_{kind}_len": MAX_HEADER_BYTES for kind in ("str", "bin", "array", "map", "ext")}



# Each user's CPU for decoding, against quota.cpu_share (cpushare.py); None outside the daemon.
shares: CpuShares | None = None


def install(cpu_share: Callable[[], float | None] | None = None) -> None:
    """Set the switch interval: the rpc loop gets the GIL back quickly from a decoding worker; and charge
    each user's decodes to ``cpu_share`` (cores, from the live config)."""
    global shares
    sys.setswitchinterval(SWITCH_INTERVAL)
    shares = None if cpu_share is None else CpuShares(cpu_share)


def note_request(owner: int) -> None:
    """A request from ``owner`` arrived (the rpc server, for each): other users' decodes are contended."""
    if shares is not None:
        shares.note(owner)


def peek_header(raw: bytes | memoryview) -> dict[str, Any]:
    """The scalar fields at the start of a header map, read from its first :data:`PEEK_BYTES` only
    (a field packed after a big one is not seen); ``ProtocolError`` if it does not start as a map."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=PEEK_BYTES, **_LIMITS)
    unpacker.feed(bytes(raw[:PEEK_BYTES]))
    out: dict[str, Any] = {}
    try:
        n = unpacker.read_map_header()
        for _ in range(min(n, 16)):
            key = unpacker.unpack()
            value = unpacker.unpack()
            if isinstance(key, str) and (value is None or isinstance(value, bool | int | float | str)):
                out[key] = value
    except msgpack.OutOfData:
        pass
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    return out


def unpack_sliced(raw: bytes | memoryview) -> dict[str, Any]:
    """:func:`autosaved.protocol.unpack_header`, fed :data:`SLICE` bytes at a time (for a worker thread:
    the GIL is free between slices)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes is over the {MAX_HEADER_BYTES} byte limit")
    view = memoryview(raw)
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(view) + 1, **_LIMITS)
    header: Any = None
    done = False
    try:
        for start in range(0, len(view), SLICE):
            unpacker.feed(view[start:start + SLICE])
            loopfirst.yield_point()
            try:
                header = unpacker.unpack()
                done = True
                break
            except msgpack.OutOfData:
                continue
        if done and unpacker.tell() != len(view):
            raise ValueError("extra data after the header")
    except Exception as exc:
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not done:
        raise ProtocolError("header is not valid msgpack: truncated")
    if not isinstance(header, dict):
        raise ProtocolError("header must be a map")
    return header


def _decode_call(fn: Callable[..., T], args: tuple[Any, ...], owner: int | None) -> T:
    point("offload", "decode", "before")
    # Root's work is not charged (quota settings exempt root).
    meter = None if shares is None or owner is None or owner == 0 else Meter(shares, owner)
    with loopfirst.stepping_aside(meter):  # the event loop's requests first (loopfirst.py)
        return fn(*args)


# Two decodes at a time, apart from the default pool the disk work uses: one user's decodes run one after
# another anyway (the rpc server holds the user), so a user sleeping for its CPU share never holds up
# another user's.
_limiter: anyio.CapacityLimiter | None = None


async def off_loop(fn: Callable[..., T], *args: Any, owner: int | None = None) -> T:
    """``fn(*args)`` in a decoding worker thread, its CPU charged to ``owner`` (cpushare.py)."""
    global _limiter
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(2)
    return await anyio.to_thread.run_sync(_decode_call, fn, args, owner, limiter=_limiter)
