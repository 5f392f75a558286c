"""The write-ahead log: deltas that asked for ``logged`` are appended here and fsynced before the ack.

Layout: ``jobs/<uid>/<job>/log/<first lsn>.wal`` segments. A record is::

    "ASW1" | payload length (u64 LE) | crc32 of payload (u32 LE) | payload
    payload = header length (u32 LE) | msgpack header | blob bytes...

The header holds the record's ``lsn`` (log sequence number, per job, +1 per record), the session seqs it
makes durable, ``step``/``meta``, and the delta as a tagged tree (:mod:`autosaved.tree`) whose blobs
follow in order. A record carries the merge of *every* delta since the last point the log or a
committed version covered, not only the one that asked for ``logged``: replaying it on the newest
version then rebuilds the exact state, because re-applying replace-semantics deltas in order is
idempotent. Each committed version records the last lsn its snapshot covered (``wal_lsn``); a commit
deletes the segments that only hold records up to it, and the daemon starts a new segment at each
snapshot so deletion is a file unlink, never a rewrite.

A torn record (a crash mid-append) can only be at the end of a segment and was never acknowledged:
readers stop that segment there, and the daemon cuts it off with a warning. A record that fails its
checksum or decoding with a whole, valid record *after* it is not a torn tail but damage (a bad sector, a
stray write): records after it were acknowledged, so nothing is cut. Readers stop there and raise
:class:`LogDamaged`; the bytes stay for an administrator (``autosaved verify`` names the place).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from ..errors import CorruptVersion, StorageError
from ..tree import MAX_DEPTH, Blob, from_node, to_node
from .faults import point, write
from .fsutil import fsync_dir, make_dirs
from .manifest import check_format

log = logging.getLogger("autosaved.wal")

MAGIC = b"ASW1"
# The digit in the magic is the record format version: "ASW2" and later are refused, never cut as torn.
FORMAT_VERSION = 1
_HEAD = struct.Struct("<4sQI")
_U32 = struct.Struct("<I")
_SEGMENT = re.compile(r"^(\d{16})\.wal$")
MAX_RECORD = 1 << 40
LOG_MAX_DEPTH = 4 * MAX_DEPTH


@dataclass
class Record:
    lsn: int
    sessions: dict[str, int]
    step: int | None
    meta: dict[str, Any]
    delta: dict[str | int, Any]


def encode(rec: Record) -> list[bytes | memoryview]:
    """The pieces of one record, ready for writev-style appending (blob bytes are not copied)."""
    node, blobs = to_node(rec.delta, allow_delete=True)
    head = msgpack.packb(
        {"lsn": rec.lsn, "sessions": rec.sessions, "step": rec.step, "meta": rec.meta, "tree": node,
         "blobs": [b.descriptor() for b in blobs]},
        use_bin_type=True,
    )
    datas: list[bytes | memoryview] = []
    for b in blobs:
        if b.data is None:
            raise ValueError("a logged delta holds a blob with no bytes in memory")
        # Bytes in a client's shared-memory slot may change while we read them: checksum and write one
        # private copy, so a scribbling client cannot make an acknowledged record fail its checksum.
        datas.append(bytes(b.data) if isinstance(b.data.obj, mmap.mmap) else b.data)
    pieces: list[bytes | memoryview] = [_U32.pack(len(head)), head, *datas]
    crc = 0
    length = 0
    for p in pieces:
        crc = zlib.crc32(p, crc)
        length += memoryview(p).nbytes
    return [_HEAD.pack(MAGIC, length, crc), *pieces]


def _decode(payload: memoryview, where: str) -> Record:
    (head_len,) = _U32.unpack_from(payload, 0)
    head = msgpack.unpackb(payload[4 : 4 + head_len], raw=False, strict_map_key=False)
    offset = 4 + head_len
    blobs = []
    for desc in head["blobs"]:
        kind, dtype, shape, nbytes = Blob.check_descriptor(desc)
        blobs.append(Blob(kind=kind, dtype=dtype, shape=shape, nbytes=nbytes, data=payload[offset : offset + nbytes]))
        offset += nbytes
    if offset != payload.nbytes:
        raise CorruptVersion(f"{where}: record length does not match its blobs")
    # Deeper than a client may send: merging deltas in the log wraps a mapping in a Replace node (one level
    # per merge point), and what the log accepted it must be able to replay.
    delta = from_node(head["tree"], blobs, allow_delete=True, allow_replace=True, max_depth=LOG_MAX_DEPTH)
    return Record(lsn=int(head["lsn"]), sessions={str(k): int(v) for k, v in head["sessions"].items()},
                  step=head.get("step"), meta=dict(head.get("meta") or {}), delta=delta)


def segments(log_dir: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), log_dir / n) for n in names if (m := _SEGMENT.match(n)))


class LogDamaged(StorageError):
    """A record in the middle of the log is unreadable while records after it are whole."""


@dataclass
class SegmentScan:
    path: Path
    records: list[Record] = field(default_factory=list)
    good_bytes: int = 0
    torn: str | None = None
    # Set instead of being cut when valid records follow the bad one (see the module docstring).
    damaged: bool = False


def _whole_record_after(data: memoryview, start: int) -> int | None:
    """The offset of the first record after ``start`` whose header and checksum hold, if any."""
    raw = data.obj if isinstance(data.obj, bytes) else bytes(data)
    at = raw.find(MAGIC, start + 1)
    while at != -1:
        if data.nbytes - at >= _HEAD.size:
            _magic, length, crc = _HEAD.unpack_from(data, at)
            end = at + _HEAD.size + length
            if length <= MAX_RECORD and end <= data.nbytes and zlib.crc32(data[at + _HEAD.size : end]) == crc:
                return at
        at = raw.find(MAGIC, at + 1)
    return None


def scan_segment(path: Path) -> SegmentScan:
    """Every whole record of a segment; ``torn`` says why reading stopped early, if it did."""
    scan = SegmentScan(path)
    data = memoryview(path.read_bytes())
    offset = 0
    while offset < data.nbytes:
        where = f"{path.name}@{offset}"
        if data.nbytes - offset < _HEAD.size:
            scan.torn = f"{where}: partial record header"
            break
        magic, length, crc = _HEAD.unpack_from(data, offset)
        if magic[:3] == MAGIC[:3] and magic[3:].isdigit():
            check_format(int(magic[3:]), FORMAT_VERSION, f"write-ahead log record {where}")
        if magic != MAGIC or length > MAX_RECORD:
            scan.torn = f"{where}: bad record header"
            break
        payload = data[offset + _HEAD.size : offset + _HEAD.size + length]
        if payload.nbytes < length:
            scan.torn = f"{where}: record cut short ({payload.nbytes} of {length} bytes)"
            break
        if zlib.crc32(payload) != crc:
            scan.torn = f"{where}: checksum mismatch"
            break
        try:
            scan.records.append(_decode(payload, where))
        except Exception as exc:
            scan.torn = f"{where}: undecodable record ({exc})"
            break
        offset += _HEAD.size + length
        scan.good_bytes = offset
    if scan.torn is not None:
        after = _whole_record_after(data, scan.good_bytes)
        if after is not None:
            scan.damaged = True
            scan.torn = f"{scan.torn}; a whole record follows at offset {after}: damage, not a torn tail"
    return scan


@dataclass
class Replay:
    records: list[Record]
    last_lsn: int
    warnings: list[str]
    # The highest lsn anywhere in the log (past a gap too): new records must be numbered above it.
    max_lsn: int = 0


def read_log(log_dir: Path, after_lsn: int, *, repair: bool = False) -> Replay:
    """Records with lsn > ``after_lsn``, in order. With ``repair`` (the daemon, which owns the log), a
    torn tail is truncated away; readers without it (offline restore) leave the files alone."""
    out: list[Record] = []
    warnings: list[str] = []
    last = after_lsn
    max_lsn = after_lsn
    gap = False
    for _, path in segments(log_dir):
        scan = scan_segment(path)
        if scan.damaged:
            # Records after the bad one were acknowledged: replaying around it could reorder updates, and
            # committing a version over it would let the log be dropped. Stop, keep every byte, report.
            raise LogDamaged(
                f"write-ahead log damaged: {scan.torn}. Nothing was cut; the job is not served until an "
                f"administrator looks at {path} (`autosaved verify` lists it; moving the segment away "
                "accepts losing its records)"
            )
        if scan.torn:
            warnings.append(f"write-ahead log torn tail cut: {scan.torn}")
            if repair:
                with open(path, "r+b") as fh:
                    fh.truncate(scan.good_bytes)
                    os.fsync(fh.fileno())
        for rec in scan.records:
            max_lsn = max(max_lsn, rec.lsn)
            if gap or rec.lsn <= last:
                continue
            if rec.lsn != last + 1:
                warnings.append(
                    f"write-ahead log has a gap (expected record {last + 1}, found {rec.lsn}); "
                    "records after the gap are not replayed"
                )
                gap = True
                continue
            out.append(rec)
            last = rec.lsn
    return Replay(out, last, warnings, max_lsn)


class WalWriter:
    """Appends records to the current segment. Used from one worker thread at a time (the daemon's
    group committer), so it needs no lock of its own."""

    def __init__(self, log_dir: Path) -> None:
        self.dir = log_dir
        self._fd: int | None = None
        self._segment_first: int | None = None

    def _open(self, first_lsn: int) -> int:
        make_dirs(self.dir)
        path = self.dir / f"{first_lsn:016d}.wal"
        point("wal", "open", "before", path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        fsync_dir(self.dir, "wal")
        self._fd, self._segment_first = fd, first_lsn
        return fd

    def append(self, records: Sequence[Record]) -> None:
        """Write records and fdatasync once (group commit). On any error the segment is abandoned: after
        a failed fsync nothing written to it may be called durable, so the next append starts a new one
        and the caller must not ack these records."""
        if not records:
            return
        fd = self._fd if self._fd is not None else self._open(records[0].lsn)
        try:
            for rec in records:
                for piece in encode(rec):
                    view = memoryview(piece).cast("B")
                    while view.nbytes:
                        point("wal", "write", "before", rec.lsn)
                        n = write(fd, view, "wal", rec.lsn)
                        view = view[n:]
            point("wal", "fsync", "before", records[-1].lsn)
            os.fdatasync(fd)
            point("wal", "fsync", "after", records[-1].lsn)
        except BaseException:
            self.close()
            raise

    def rotate(self) -> None:
        """Start a new segment with the next record (called when a snapshot is taken)."""
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._segment_first = None

    def drop_through(self, lsn: int) -> None:
        """Delete closed segments whose records all have lsn ≤ ``lsn`` (a committed version covers them).

        A segment ends where the next one starts; the newest closed one is scanned for its last lsn."""
        segs = segments(self.dir)
        removed = False
        for i, (first, path) in enumerate(segs):
            if first == self._segment_first or first > lsn:
                continue
            if i + 1 < len(segs):
                covered = segs[i + 1][0] - 1 <= lsn
            else:
                scan = scan_segment(path)
                covered = not scan.records or scan.records[-1].lsn <= lsn
            if covered:
                point("wal", "delete", "before", path)
                path.unlink(missing_ok=True)
                point("wal", "delete", "after", path)
                removed = True
        if removed:
            fsync_dir(self.dir, "wal")

