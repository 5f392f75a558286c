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

What replay keeps, and what it refuses (the rule). Each record's header also carries ``synced``: the
lsn of the last record *of its segment* that an ``fdatasync`` had made durable before this record was
written (0: none yet). An ack is sent only after its record's sync returned, so a record at or below a
later record's ``synced`` may have been acknowledged; one above every later record's ``synced`` never was
(its batch's sync never returned, or is not known to have).

- Everything up to the last synced position must be intact. A record that fails its checksum, its
  header or its decoding while a later whole record of the segment says it was synced (its lsn is at or
  below that record's ``synced``) is *damage* (a bad sector, a stray write): nothing is cut, readers raise
  :class:`LogDamaged`, the job is not served, and the error names the segment, the offset and the
  operator's remedy. Records written before this field existed count as synced (the old, strict rule).
- Past the last synced position the bytes are an unacknowledged tail that a power cut may have left in
  any shape (later writes kept and earlier ones lost, a write torn at a sector): readers stop at the first
  bad record, whatever whole records follow, and the daemon (which owns the log) cuts the segment there
  with a warning. Only the newest segment's tail can legitimately be such a tail, plus the tail of a
  segment abandoned by a failed append, whose records a committed version covers.
- So a cut in an older segment must lose nothing the replay needs: if the next segment starts (by its
  name, or by its first record) past the last record read, and the missing records are newer than the
  base version (``after_lsn``), those records were acknowledged (a later segment exists only after a
  sync or a snapshot) and the log is :class:`LogDamaged`, never replayed short. Likewise a gap in lsns
  after records were already replayed. A gap at the very start (the base version fell back past a
  corrupt newer one whose log was already dropped) is reported with a warning, as before.

A last-batch record damaged *after* its sync (bit rot in the newest, never-confirmed batch) cannot be
told apart from a torn tail on disk; it is cut with the same warning. Power loss never produces it. A
whole record whose checksum matches but which does not decode is never a torn write: it is damage (a
record of a newer or broken writer), refused like the rest, wherever it stands.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from ..errors import CorruptVersion, StorageError
from ..tree import MAX_DEPTH, Blob, from_node, to_node
from . import fileops
from .faults import point
from .fileops import truncate_fsync
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
    # Read back from the log: the lsn its segment was synced through before this record was written
    # (``None`` for a record written before the field existed). See the module docstring.
    synced: int | None = None


def encode(rec: Record, synced: int = 0) -> list[bytes | memoryview]:
    """The pieces of one record, ready for writev-style appending (blob bytes are not copied).
    ``synced``: the last lsn of this segment a sync made durable before this record is written."""
    return _encode(rec, *to_node(rec.delta, allow_delete=True), synced)


def _encode(rec: Record, node: Any, blobs: list[Blob], synced: int) -> list[bytes | memoryview]:
    head = msgpack.packb(
        {"lsn": rec.lsn, "sessions": rec.sessions, "step": rec.step, "meta": rec.meta, "tree": node,
         "blobs": [b.descriptor() for b in blobs], "synced": synced},
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


# Pieces smaller than this are joined into one buffer (one write); larger ones are written as they are.
COALESCE = 1 << 16


def coalesce(pieces: Sequence[bytes | memoryview], limit: int = COALESCE) -> list[bytes | memoryview]:
    """``pieces`` as few buffers, in order: runs of small pieces joined (a copy of at most ``limit`` bytes
    each), large pieces kept as views (a blob is never copied only to save a system call)."""
    out: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = []
    size = 0
    for p in pieces:
        n = memoryview(p).nbytes
        if n >= limit:
            if run:
                out.append(b"".join(run))
                run, size = [], 0
            out.append(p)
            continue
        run.append(p)
        size += n
        if size >= limit:
            out.append(b"".join(run))
            run, size = [], 0
    if run:
        out.append(b"".join(run))
    return out


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
    synced = head.get("synced")
    return Record(lsn=int(head["lsn"]), sessions={str(k): int(v) for k, v in head["sessions"].items()},
                  step=head.get("step"), meta=dict(head.get("meta") or {}), delta=delta,
                  synced=int(synced) if synced is not None else None)


def segments(log_dir: Path) -> list[tuple[int, Path]]:
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    return sorted((int(m.group(1)), log_dir / n) for n in names if (m := _SEGMENT.match(n)))


class LogDamaged(StorageError):
    """Records the log must hold are unreadable (see the module docstring): the job is not served."""


class LogChanged(StorageError):
    """A segment vanished while the log was read: a daemon committed a version and dropped the segments it
    covers meanwhile. The reader starts again from the newest version (see ``JobStore.recover``)."""


@dataclass
class SegmentScan:
    path: Path
    records: list[Record] = field(default_factory=list)
    good_bytes: int = 0
    torn: str | None = None
    # Set instead of being cut when a later record says the bad one was synced (see the module docstring).
    damaged: bool = False
    # The lsn its name says its first record has (None for a file not named like a segment).
    first_lsn: int | None = None
    # Whole records after the cut that were never confirmed synced (dropped with the unacknowledged tail).
    unsynced_after: int = 0

    @property
    def last_lsn(self) -> int:
        """The lsn of the last record read (the one before the segment's first when none was)."""
        if self.records:
            return self.records[-1].lsn
        return self.first_lsn - 1 if self.first_lsn is not None else 0


def _whole_records_after(data: memoryview, start: int) -> Iterator[tuple[int, int | None]]:
    """(offset, ``synced``) of each record after ``start`` whose header and checksum hold. ``synced`` is
    ``None`` where the record predates the field (or its header does not decode): it then counts as
    confirming everything before it, the strict rule of older logs."""
    raw = data.obj if isinstance(data.obj, bytes) else bytes(data)
    at = raw.find(MAGIC, start + 1)
    while at != -1:
        if data.nbytes - at >= _HEAD.size:
            _magic, length, crc = _HEAD.unpack_from(data, at)
            end = at + _HEAD.size + length
            if length <= MAX_RECORD and end <= data.nbytes and zlib.crc32(data[at + _HEAD.size : end]) == crc:
                synced: int | None = None
                try:
                    (head_len,) = _U32.unpack_from(data, at + _HEAD.size)
                    head = msgpack.unpackb(data[at + _HEAD.size + 4 : at + _HEAD.size + 4 + head_len], raw=False,
                                           strict_map_key=False)
                    value = head.get("synced") if isinstance(head, dict) else None
                    synced = int(value) if isinstance(value, int) else None
                except Exception:
                    synced = None
                yield at, synced
                at = raw.find(MAGIC, end) if end > at else raw.find(MAGIC, at + 1)
                continue
        at = raw.find(MAGIC, at + 1)


def _first_lsn(path: Path) -> int | None:
    m = _SEGMENT.match(path.name)
    return int(m.group(1)) if m else None


def scan_segment(path: Path) -> SegmentScan:
    """Every whole record of a segment; ``torn`` says why reading stopped early, if it did, and
    ``damaged`` whether what follows proves the bad record was synced (see the module docstring)."""
    scan = SegmentScan(path, first_lsn=_first_lsn(path))
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
            # Its checksum matched: a power cut does not write whole records that fail to decode, so this is
            # a record another autosaved wrote (newer, or broken) and cutting it would drop an acked update.
            scan.torn = f"{where}: a record with a valid checksum does not decode ({exc})"
            scan.damaged = True
            break
        offset += _HEAD.size + length
        scan.good_bytes = offset
    if scan.torn is not None and not scan.damaged:
        bad_lsn = scan.last_lsn + 1
        for at, synced in _whole_records_after(data, scan.good_bytes):
            if synced is None or synced >= bad_lsn:
                scan.damaged = True
                said = "predates sync markers" if synced is None else f"says records through {synced} were synced"
                scan.torn = (f"{scan.torn} (record {bad_lsn}); the whole record at offset {at} {said}: "
                             "damage, not a torn tail")
                break
            scan.unsynced_after += 1
        if not scan.damaged and scan.unsynced_after:
            scan.torn += (f"; {scan.unsynced_after} whole record(s) after it were never confirmed synced "
                          "(an unacknowledged tail)")
    return scan


def _damage(path: Path, good_bytes: int | None, reason: str, first_lost: int, later: list[Path]) -> LogDamaged:
    """The error for records the log must hold and does not: where, and what an operator may do."""
    cut = f"truncate {path} to {good_bytes} bytes (`truncate -s {good_bytes} {path}`), " if good_bytes is not None \
        else ""
    move = f"move {', '.join(p.name for p in later)} out of {path.parent}, " if later else ""
    return LogDamaged(
        f"write-ahead log damaged: {reason}. Records from {first_lost} on were acknowledged and cannot be read: "
        f"nothing was cut and the job is not served (`autosaved verify` lists the place). To serve it without "
        f"record {first_lost} and everything after it (they are lost), {cut}{move}then restart the daemon or retry"
    )


@dataclass
class Replay:
    records: list[Record]
    last_lsn: int
    warnings: list[str]
    # The highest lsn anywhere in the log (past a gap too): new records must be numbered above it.
    max_lsn: int = 0
    # Bytes of every segment scanned: what the next replay of this log reads.
    bytes: int = 0
    # The log did not start where the base version ends (records after the gap were not replayed).
    gap: bool = False


class ReplaySpeed:
    """How fast this host replays a log (bytes/s, read, checked and decoded), measured on the larger
    replays and assumed until then; the log-size policy turns ``policy.replay_time`` into bytes with it."""

    ASSUMED = 200.0 * 1024**2
    MIN_SAMPLE = 4 * 1024**2

    def __init__(self) -> None:
        self.value = self.ASSUMED
        self.measured = False

    def add(self, nbytes: int, seconds: float) -> None:
        if nbytes < self.MIN_SAMPLE or seconds <= 0:
            return
        speed = nbytes / seconds
        # The slowest recent replay counts most: a bound derived from it holds when the disk is busy too.
        self.value = speed if not self.measured else min(speed, 0.5 * self.value + 0.5 * speed)
        self.measured = True


replay_speed = ReplaySpeed()


def read_log(log_dir: Path, after_lsn: int, *, repair: bool = False) -> Replay:
    """Records with lsn > ``after_lsn``, in order. With ``repair`` (the daemon, which owns the log), an
    unacknowledged tail is truncated away; readers without it (offline restore) leave the files alone.
    Raises :class:`LogDamaged` where the log lacks records it must hold (see the module docstring)."""
    out: list[Record] = []
    warnings: list[str] = []
    last = after_lsn
    max_lsn = after_lsn
    gap = False
    cut_before = False  # the previous segment was cut short
    started = time.monotonic()
    total = 0
    segs = segments(log_dir)
    for i, (_, path) in enumerate(segs):
        try:
            scan = scan_segment(path)
        except FileNotFoundError:
            raise LogChanged(f"write-ahead log segment {path} vanished while it was read") from None
        total += scan.good_bytes
        later = [p for _, p in segs[i + 1:]]
        if scan.damaged:
            # Records after the bad one were acknowledged: replaying around it could reorder updates, and
            # committing a version over it would let the log be dropped. Stop, keep every byte, report.
            raise _damage(path, scan.good_bytes, str(scan.torn), scan.last_lsn + 1, later)
        if scan.torn and later:
            # Only the newest segment's tail may be unacknowledged. An older one's cut loses nothing only if
            # the next segment starts right after it, or a committed version covers what is missing.
            next_first = segs[i + 1][0]
            if next_first - 1 > max(scan.last_lsn, after_lsn):
                raise _damage(path, scan.good_bytes, f"{scan.torn} in a segment that is not the newest "
                              f"(records {scan.last_lsn + 1}-{next_first - 1} are missing before {later[0].name})",
                              max(scan.last_lsn, after_lsn) + 1, later)
        if scan.torn:
            warnings.append(f"write-ahead log torn tail cut: {scan.torn}")
        if repair:
            # Cut the unacknowledged tail, and make what stays durable: a daemon that was SIGKILLed between
            # a write and its sync left records in the page cache only, and this replay builds on them
            # (later records are deltas over them), so a power cut must not take them after this point.
            truncate_fsync(path, scan.good_bytes if scan.torn else None)
        for rec in scan.records:
            max_lsn = max(max_lsn, rec.lsn)
            if gap or rec.lsn <= last:
                continue
            if rec.lsn != last + 1:
                if out or cut_before:
                    raise _damage(path, None, f"record {last + 1} is missing (the log goes on at {rec.lsn} in "
                                  f"{path.name})", last + 1, [path, *later])
                warnings.append(
                    f"write-ahead log has a gap (expected record {last + 1}, found {rec.lsn}); "
                    "records after the gap are not replayed"
                )
                gap = True
                continue
            out.append(rec)
            last = rec.lsn
        cut_before = scan.torn is not None
    replay_speed.add(total, time.monotonic() - started)
    return Replay(out, last, warnings, max_lsn, total, gap)


# Records whose blobs hold at most this many bytes in all are framed ahead by :meth:`WalWriter.frame`.
FRAME_AHEAD = 1 << 16


@dataclass
class Framed:
    """Records encoded ahead of their append (:meth:`WalWriter.frame`): each record's buffers."""

    buffers: list[list[bytes | memoryview]]
    # The segment's ``synced`` they carry: an append whose segment is not in that state frames them again.
    synced: int


class WalWriter:
    """Appends records to the current segment. Used from one worker thread at a time (the daemon's
    group committer), so it needs no lock of its own."""

    def __init__(self, log_dir: Path, size: int = 0) -> None:
        self.dir = log_dir
        self._fd: int | None = None
        self._segment_first: int | None = None
        # The last lsn of the current segment an fdatasync made durable: every record carries it, so a
        # replay knows which bad bytes were synced (damage) and which never were (a torn tail).
        self._synced = 0
        # Bytes in this log's segments on disk (what a replay would read): ``size`` at load, then kept up
        # to date by appends and drops. Read from the event loop for the log-size policy.
        self.size = size

    def _open(self, first_lsn: int) -> int:
        make_dirs(self.dir)
        path = self.dir / f"{first_lsn:016d}.wal"
        point("wal", "open", "before", path)
        fd = fileops.open_fd(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        fsync_dir(self.dir, "wal")
        self._fd, self._segment_first, self._synced = fd, first_lsn, 0
        return fd

    def frame(self, records: Sequence[Record], *, rotate: bool = False) -> Framed | None:
        """Encode ``records`` now, for the :meth:`append` that follows (with ``rotate``: after a
        :meth:`rotate`), so the thread that appends only writes and syncs (issue 21: the log thread's
        Python work is what it and the event loop take turns on the GIL for). Call it while no append of
        this log runs (the daemon: on the event loop, holding the log's lock). None where the blobs are
        large (over :data:`FRAME_AHEAD` bytes): checksumming those would hold up the caller; the append
        frames them itself."""
        encoded = []
        for rec in records:
            node, blobs = to_node(rec.delta, allow_delete=True)
            if sum(b.nbytes for b in blobs) > FRAME_AHEAD:
                return None
            encoded.append((rec, node, blobs))
        synced = self._next_synced(rotate)
        return Framed([coalesce(_encode(rec, node, blobs, synced)) for rec, node, blobs in encoded], synced)

    def _next_synced(self, rotate: bool = False) -> int:
        """The ``synced`` the next record written carries (a new segment starts from 0)."""
        return 0 if rotate or self._fd is None else self._synced

    def append(self, records: Sequence[Record], framed: Framed | None = None) -> None:
        """Write records (``framed``: as :meth:`frame` encoded them) and fdatasync once (group commit). On
        any error the segment is abandoned: after a failed fsync nothing written to it may be called
        durable, so the next append starts a new one and the caller must not ack these records."""
        if not records:
            return
        if framed is not None and framed.synced != self._next_synced():
            framed = None  # framed for another state of the segment: the markers must be this one's
        fd = self._fd if self._fd is not None else self._open(records[0].lsn)
        try:
            for i, rec in enumerate(records):
                point("wal", "write", "before", rec.lsn)
                # Framed once: a small record is one write (issue 21: it was one per piece, three or more);
                # only large blobs keep writes of their own, never copied. Still one write (at least) per
                # record, never one for a whole batch: the power-loss checker gives each write its own fate,
                # so it keeps building the states where a later record of an unsynced batch survives an
                # earlier one (test_powerloss's reordered group commit), as a disk's writeback may.
                bufs = framed.buffers[i] if framed is not None else coalesce(encode(rec, self._synced))
                for buf in bufs:
                    view = memoryview(buf).cast("B")
                    while view.nbytes:
                        n = fileops.write(fd, view, "wal", rec.lsn)
                        self.size += n
                        view = view[n:]
            point("wal", "fsync", "before", records[-1].lsn)
            fileops.fdatasync(fd)
            self._synced = records[-1].lsn
            point("wal", "fsync", "after", records[-1].lsn)
        except BaseException:
            self.close()
            raise

    def rotate(self) -> None:
        """Start a new segment with the next record (called when a snapshot is taken)."""
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            fileops.close(self._fd)
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
                with contextlib.suppress(FileNotFoundError):
                    self.size = max(0, self.size - path.stat().st_size)
                fileops.unlink(path, missing_ok=True)
                point("wal", "delete", "after", path)
                removed = True
        if removed:
            fsync_dir(self.dir, "wal")

