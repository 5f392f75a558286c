"""Property-based tests (hypothesis) of the three formats untrusted bytes arrive in: the state tree
codec (wire and manifest), the wire header, and the write-ahead log record. Round-trips are exact;
garbage never crashes, it raises the documented error (``ProtocolError`` for wire and tree input; the
log reader stops at damage and returns the whole records before it)."""

from __future__ import annotations

import contextlib
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autosaved.codec import pack, unpack
from autosaved.errors import AutosavedError, CorruptVersion, InvalidValue, ProtocolError
from autosaved.names import validate_job_name
from autosaved.protocol import (
    PROTOCOL_VERSION,
    blobs_from_frames,
    check_request,
    pack_header,
    unpack_header,
)
from autosaved.storage.manifest import UnsupportedFormat, seal, unseal
from autosaved.storage.wal import Record, encode, scan_segment
from autosaved.testing.crashsim import canon
from autosaved.tree import DELETE, Blob, from_node, to_node

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_DTYPES = ["|u1", "|i1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16", "|b1"]


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize, max_size=int(np.prod(shape)) * dtype.itemsize))
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape) if raw or not shape else np.zeros(shape, dtype)
    return arr.copy()


_scalars = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=20) | st.binary(max_size=64) | arrays())
_keys = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10)
trees = st.recursive(
    _scalars,
    lambda sub: (st.lists(sub, max_size=4) | st.lists(sub, max_size=4).map(tuple)
                 | st.dictionaries(_keys, sub, max_size=4)),
    max_leaves=25,
)
states = st.dictionaries(_keys, trees, max_size=5)


def _same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN (bit patterns of arrays compare as bytes in ``canon``)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return (list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b, strict=True))
                and all(_same(a[k], b[k]) for k in a))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(canon(a) == canon(b))
    if isinstance(a, bytes) and isinstance(b, np.ndarray):
        return False
    return type(a) is type(b) and bool(canon(a) == canon(b))


def _wire_roundtrip(value: Any) -> Any:
    """What the SDK sends and the daemon decodes: tree → node + frames → msgpack → back."""
    node, blobs = to_node(pack(value))
    header = unpack_header(pack_header({"v": PROTOCOL_VERSION, "tree": node, "blobs": [b.descriptor() for b in blobs]}))
    assert all(b.data is not None for b in blobs)
    frames = [memoryview(bytes(b.data)) for b in blobs if b.data is not None]
    return from_node(header["tree"], blobs_from_frames(header["blobs"], frames))


@FUZZ
@given(states)
def test_tree_roundtrips_over_the_wire_exactly(value: dict[Any, Any]) -> None:
    back = unpack(_wire_roundtrip(value))
    assert _same(_normalise(value), _normalise(back))


@FUZZ
@given(states)
def test_tree_roundtrips_through_a_sealed_manifest_exactly(value: dict[Any, Any]) -> None:
    node, blobs = to_node(pack(value))
    doc = unseal(seal({"format": 1, "tree": node, "blobs": [b.descriptor() for b in blobs]}), "fuzz")
    rebuilt = [Blob(kind=b.kind, dtype=b.dtype, shape=b.shape, nbytes=b.nbytes, data=b.data) for b in blobs]
    back = unpack(from_node(doc["tree"], rebuilt))
    assert _same(_normalise(value), _normalise(back))


def _normalise(v: Any) -> Any:
    """numpy 0-d arrays and bytes leaves are returned as arrays/bytes; compare them as canon tuples."""
    if isinstance(v, dict):
        return {k: _normalise(s) for k, s in v.items()}
    if isinstance(v, list):
        return [_normalise(s) for s in v]
    if isinstance(v, tuple):
        return tuple(_normalise(s) for s in v)
    if isinstance(v, bytes):
        return ("bytes", v)
    if isinstance(v, np.ndarray):
        return ("nd", v.dtype.str, v.shape, v.tobytes())
    return v


_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda sub: (st.lists(sub, max_size=4)
                 | st.dictionaries(st.sampled_from(["m", "l", "t", "b", "F", "I", "x", "r", "v", "op"]) | st.text(
                     max_size=3), sub, max_size=2)),
    max_leaves=20,
)


@FUZZ
@given(_junk, st.integers(0, 3), st.booleans())
def test_tree_garbage_raises_protocol_error_only(node: Any, nblobs: int, lenient: bool) -> None:
    blobs = [Blob(kind="bytes", dtype="bytes", shape=(1,), nbytes=1, data=memoryview(b"x")) for _ in range(nblobs)]
    with contextlib.suppress(ProtocolError):
        from_node(node, blobs, allow_delete=lenient, allow_replace=lenient)


@FUZZ
@given(st.binary(max_size=300))
def test_header_garbage_raises_protocol_error_only(raw: bytes) -> None:
    try:
        header = unpack_header(raw)
    except ProtocolError:
        return
    assert isinstance(header, dict)
    with contextlib.suppress(ProtocolError):
        check_request(header)


@FUZZ
@given(st.dictionaries(st.text(max_size=6), _junk, max_size=6), st.binary(max_size=40))
def test_header_roundtrip_and_field_garbage(fields: dict[str, Any], tail: bytes) -> None:
    header = {"v": PROTOCOL_VERSION, "op": "ping", "seq": 1, **fields}
    raw = pack_header(header)
    assert pack_header(unpack_header(raw)) == raw  # byte-exact (NaN-safe) round trip
    for raw in (pack_header(header) + tail, pack_header(header)[: len(tail)]):
        with contextlib.suppress(ProtocolError):
            check_request(unpack_header(raw))
    with contextlib.suppress(ProtocolError):
        blobs_from_frames(fields.get("blobs", fields.get("op")), [memoryview(tail)])
    with contextlib.suppress(AutosavedError):
        validate_job_name(fields.get("job", tail.decode("utf-8", "replace")))


@FUZZ
@given(_junk)
def test_blob_descriptor_garbage_raises_protocol_error_only(desc: Any) -> None:
    with contextlib.suppress(ProtocolError):
        Blob.check_descriptor(desc)


_sessions = st.dictionaries(st.text(min_size=1, max_size=8), st.integers(0, 2**40), max_size=3)
_meta = st.dictionaries(st.text(max_size=8), st.none() | st.integers(-1000, 1000) | st.text(max_size=8), max_size=3)


@st.composite
def records(draw: st.DrawFn, first: int = 1) -> list[Record]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        delta = draw(st.dictionaries(_keys, trees | st.just(DELETE), min_size=1, max_size=3))
        out.append(Record(lsn=first + i, sessions=draw(_sessions), step=draw(st.none() | st.integers(0, 2**40)),
                          meta=draw(_meta), delta=pack(delta, allow_delete=True)))
    return out


def _write_segment(path: Path, recs: list[Record]) -> bytes:
    data = b"".join(bytes(memoryview(p).cast("B")) for r in recs for p in encode(r))
    path.write_bytes(data)
    return data


def _rec_canon(r: Record) -> Any:
    def blobs_to_bytes(v: Any) -> Any:
        if isinstance(v, Blob):
            return ("blob", v.kind, v.dtype, v.shape, bytes(v.data) if v.data is not None else None)
        if isinstance(v, dict):
            return {k: blobs_to_bytes(s) for k, s in v.items()}
        if isinstance(v, list | tuple):
            return type(v)(blobs_to_bytes(s) for s in v)
        if v is DELETE:
            return "<DELETE>"
        if isinstance(v, float) and math.isnan(v):
            return "<nan>"
        return v

    return (r.lsn, r.sessions, r.step, r.meta, blobs_to_bytes(r.delta))


@FUZZ
@given(records())
def test_log_records_roundtrip_exactly(tmp_path_factory: Any, recs: list[Record]) -> None:
    path = tmp_path_factory.mktemp("wal") / "0000000000000001.wal"
    _write_segment(path, recs)
    scan = scan_segment(path)
    assert scan.torn is None
    assert [_rec_canon(r) for r in scan.records] == [_rec_canon(r) for r in recs]


@FUZZ
@given(records(), st.data())
def test_damaged_log_segment_yields_a_prefix_never_a_crash(tmp_path_factory: Any, recs: list[Record],
                                                          data: st.DataObject) -> None:
    path = tmp_path_factory.mktemp("wal") / "0000000000000001.wal"
    raw = bytearray(_write_segment(path, recs))
    how = data.draw(st.sampled_from(["truncate", "flip", "append", "splice"]))
    if how == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif how == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "append":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    path.write_bytes(bytes(raw))
    try:
        scan = scan_segment(path)
    except (CorruptVersion, ProtocolError, UnsupportedFormat):
        return  # reported damage is a documented outcome
    got = [_rec_canon(r) for r in scan.records]
    assert got == [_rec_canon(r) for r in recs][: len(got)]


@FUZZ
@given(st.binary(max_size=400))
def test_log_garbage_never_crashes(tmp_path_factory: Any, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("wal") / "0000000000000001.wal"
    # Half the time, a valid-looking header in front, so the checksum and decoder paths are reached.
    framed = b"ASW1" + len(raw).to_bytes(8, "little") + zlib.crc32(raw).to_bytes(4, "little") + raw
    for data in (raw, framed):
        path.write_bytes(data)
        try:
            scan = scan_segment(path)
        except (CorruptVersion, ProtocolError, UnsupportedFormat):
            continue
        assert scan.good_bytes <= len(data)


@FUZZ
@given(st.integers(2**64, 2**80) | st.integers(-(2**80), -(2**63) - 1))
def test_int_key_outside_64_bits_is_a_clear_error(key: int) -> None:
    """Found by the round-trip property: such a key passed validation and crashed msgpack later."""
    try:
        to_node(pack({key: 1}))
    except InvalidValue as exc:
        assert "64-bit" in str(exc)
    else:
        raise AssertionError("accepted an int key msgpack cannot carry")


@FUZZ
@given(_junk, _junk, _junk, _junk)
def test_request_fields_of_any_type_raise_protocol_error_only(v: Any, op: Any, seq: Any, job: Any) -> None:
    """Found by the daemon fuzz loop: an ``op`` that is a map or list made ``check_request`` raise
    TypeError (an internal error reply) instead of ProtocolError."""
    for header in ({"v": v, "op": op, "seq": seq, "job": job}, {"v": PROTOCOL_VERSION, "op": op, "seq": 1},
                   {"v": PROTOCOL_VERSION, "op": "ping", "seq": seq}):
        with contextlib.suppress(ProtocolError):
            check_request(header)
