"""What replay keeps and what it refuses (issue 19, defects 7 and 8; the rule is in storage/wal.py's
docstring): damage to records the log must hold refuses the job, naming the segment and the remedy; an
unsynced tail that a power cut left in any shape is cut, never mistaken for damage."""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

import autosaved
from autosaved.errors import AutosavedError
from autosaved.storage.local import JobStore
from autosaved.storage.wal import LogDamaged, Record, WalWriter, read_log, scan_segment, segments
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY


def _rec(lsn: int) -> Record:
    return Record(lsn=lsn, sessions={"s": lsn}, step=lsn, meta={}, delta={"n": lsn, f"k{lsn}": lsn})


def _write(log: Path, *segments_of_batches: list[list[int]]) -> None:
    """One segment per argument, each a list of batches (one fdatasync each), in order."""
    w = WalWriter(log)
    for batches in segments_of_batches:
        for batch in batches:
            w.append([_rec(n) for n in batch])
        w.rotate()
    w.close()


def _offsets(path: Path) -> list[int]:
    """Where each record of a segment starts."""
    data = path.read_bytes()
    out, at = [], data.find(b"ASW1")
    while at != -1:
        out.append(at)
        at = data.find(b"ASW1", at + 1)
    return out


def _zero_record(path: Path, index: int) -> None:
    """Zero the ``index``-th record of a segment (a write a power cut never let reach the disk)."""
    data = bytearray(path.read_bytes())
    starts = [*_offsets(path), len(data)]
    data[starts[index]:starts[index + 1]] = bytes(starts[index + 1] - starts[index])
    path.write_bytes(bytes(data))


def _flip_in_record(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[_offsets(path)[index] + 30] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_unsynced_batch_reordered_by_a_crash_is_a_torn_tail(tmp_path: Path) -> None:
    """Defect 8: batch [6, 7, 8] was written but its sync never returned; the crash kept 7 and 8 and lost
    6. Every synced record (1-5) replays, and the daemon's repair cuts the tail at 6."""
    log = tmp_path / "log"
    _write(log, [[1, 2], [3, 4, 5], [6, 7, 8]])
    (seg,) = [p for _, p in segments(log)]
    cut_at = _offsets(seg)[5]
    _zero_record(seg, 5)
    replay = read_log(log, 0)
    assert [r.lsn for r in replay.records] == [1, 2, 3, 4, 5]
    assert any("never confirmed synced" in w for w in replay.warnings), replay.warnings
    read_log(log, 0, repair=True)
    assert seg.stat().st_size == cut_at


def test_a_damaged_record_in_a_synced_batch_is_refused(tmp_path: Path) -> None:
    """A record of batch [3, 4, 5] is unreadable, and batch [6] was written after that batch's sync: 4
    was acknowledged, so the job is refused and not a byte is cut."""
    log = tmp_path / "log"
    _write(log, [[1, 2], [3, 4, 5], [6]])
    (seg,) = [p for _, p in segments(log)]
    _zero_record(seg, 3)
    before = seg.read_bytes()
    with pytest.raises(LogDamaged, match=rf"damaged.*{seg.name}.*record 4.*truncate -s \d+") as err:
        read_log(log, 0, repair=True)
    assert "synced" in str(err.value)
    assert seg.read_bytes() == before


def test_damage_at_the_end_of_an_older_segment_is_refused_not_cut(tmp_path: Path) -> None:
    """Defect 7: the last record of a segment that is not the newest is unreadable. Its records were
    acknowledged (a later segment exists): the job is refused, naming the segment; once a committed
    version covers them, the same bytes are harmless."""
    log = tmp_path / "log"
    _write(log, [[1], [2]], [[3], [4, 5]])
    first, second = (p for _, p in segments(log))
    _flip_in_record(first, 1)
    assert scan_segment(first).damaged is False  # alone, it looks like a torn tail
    with pytest.raises(LogDamaged, match=rf"{first.name}.*not the newest.*move {second.name}"):
        read_log(log, 0, repair=True)
    assert [r.lsn for r in read_log(log, 2).records] == [3, 4, 5]


def test_a_missing_segment_between_replayed_records_is_refused(tmp_path: Path) -> None:
    log = tmp_path / "log"
    _write(log, [[1, 2]], [[3]], [[4, 5]])
    segs = [p for _, p in segments(log)]
    segs[1].unlink()
    with pytest.raises(LogDamaged, match="record 3 is missing"):
        read_log(log, 0)


def test_old_records_without_sync_markers_keep_the_strict_rule(tmp_path: Path) -> None:
    """Records written before the marker existed count as confirming everything before them."""
    log = tmp_path / "log"
    _write(log, [[1], [2], [3]])
    (seg,) = [p for _, p in segments(log)]
    data = seg.read_bytes().replace(b"\xa6synced", b"\xa6syncex")  # the key renamed: an unknown field
    # Re-seal each record's checksum over its edited header.
    out = bytearray()
    starts = [*_offsets(seg), len(data)]
    for a, b in itertools.pairwise(starts):
        rec = bytearray(data[a:b])
        payload = bytes(rec[16:])
        rec[12:16] = zlib.crc32(payload).to_bytes(4, "little")
        out += rec
    seg.write_bytes(bytes(out))
    assert [r.synced for r in scan_segment(seg).records] == [None, None, None]
    _zero_record(seg, 1)
    with pytest.raises(LogDamaged, match="predates sync markers"):
        read_log(log, 0)


def _log_dir(d: PrivateDaemon, job: str) -> Path:
    return d.state_dir / "jobs" / str(os.geteuid()) / job / "log"


def test_daemon_refuses_a_job_whose_older_segment_lost_acked_records(
        make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    """Defect 7 end to end: a failed save leaves two segments; a flipped byte in the older one's last
    record (acked r2) makes the daemon and the offline restore refuse the job, never serve r1 + nothing."""
    faults = tmp_path / "faults"
    d = make_daemon(NO_AUTO_POLICY, env={"AUTOSAVED_FAULTS_FILE": str(faults)})
    with autosaved.Client("seg", address=d.address) as c:
        for n in (1, 2):
            c.update({"r": n, f"k{n}": n}, wait="logged")
        faults.write_text("manifest.rename.before 1 eio\n")
        with pytest.raises(AutosavedError):
            c.save()
        faults.unlink()
        for n in (3, 4, 5):
            c.update({"r": n, f"k{n}": n}, wait="logged")
    d.kill()
    first, second = (p for _, p in segments(_log_dir(d, "seg")))
    _flip_in_record(first, 1)
    before = first.read_bytes()
    with pytest.raises(AutosavedError, match=f"damaged.*{first.name}"):
        autosaved.restore("seg", state_dir=d.state_dir)
    d.start()
    c = autosaved.Client("seg", address=d.address)
    with pytest.raises(AutosavedError, match=f"damaged.*{first.name}.*{second.name}"):
        c.connect()
    c.close()
    assert first.read_bytes() == before  # nothing acknowledged was cut
    assert d.proc is not None and d.proc.poll() is None
    report = JobStore(d.state_dir, os.geteuid(), "seg").check()  # what `autosaved verify` shows
    assert report["ok"] is False and first.name in report["log"]["damaged"][0]


def test_daemon_serves_every_synced_record_of_a_reordered_tail(make_daemon: Callable[..., PrivateDaemon]) -> None:
    """Defect 8 end to end: a log whose unsynced last batch lost its first record (kept the others) is
    served with every synced record, and the daemon goes on logging after it."""
    d = make_daemon(NO_AUTO_POLICY, start=False)
    log = _log_dir(d, "tail")
    _write(log, [[1, 2], [3], [4, 5, 6]])
    (seg,) = [p for _, p in segments(log)]
    _zero_record(seg, 3)
    d.start()
    expected = {"n": 3, "k1": 1, "k2": 2, "k3": 3}
    with autosaved.Client("tail", address=d.address) as c:
        assert c.restore() == expected
        c.update({"after": 1}, wait="logged")
    d.kill()
    assert autosaved.restore("tail", state_dir=d.state_dir) == {**expected, "after": 1}


def test_an_offline_reader_racing_a_commit_reads_the_newest_state(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """An offline restore lists the versions, then a daemon commits a newer one and drops the log segment
    the older one needed, then the reader reads the log: it starts again from the newest version instead
    of serving the older one without the logged record (seen once the recovery save ran at every load)."""
    import autosaved.storage.local as local_mod
    from autosaved.codec import pack

    store = JobStore(tmp_path, os.geteuid(), "race")
    common = {"reason": "test", "meta": {}, "sessions": {}, "chunk_size": 64 * 1024, "step": None}
    store.write_version(pack({"n": 1}), version=1, **common)  # type: ignore[arg-type]
    w = WalWriter(store.log_dir)
    w.append([Record(lsn=1, sessions={}, step=None, meta={}, delta={"n": 2})])
    w.close()
    real = local_mod.read_log
    raced = []

    def racing(log_dir: Path, after: int, **kw: bool) -> object:
        if not raced:  # the daemon's commit lands between the reader's listing and its log read
            raced.append(True)
            store.write_version(pack({"n": 2}), version=2, wal_lsn=1, **common)  # type: ignore[arg-type]
            for _, seg in segments(log_dir):
                seg.unlink()
        return real(log_dir, after, **kw)

    monkeypatch.setattr(local_mod, "read_log", racing)
    recovered = store.recover()
    assert recovered is not None and recovered.tree == {"n": 2}


def test_a_whole_record_that_does_not_decode_is_refused_even_at_the_tail(tmp_path: Path) -> None:
    """A record whose checksum matches but whose payload does not decode (a newer or broken writer: a power
    cut never writes one) was cut as a torn tail, silently dropping an acknowledged update. Even as the
    newest segment's last record it is damage: refused, not a byte cut."""
    log = tmp_path / "log"
    _write(log, [[1, 2], [3]])
    (seg,) = [p for _, p in segments(log)]
    data = bytearray(seg.read_bytes())
    at = _offsets(seg)[2]
    (length,) = struct.unpack_from("<Q", data, at + 4)
    payload = b"\xc1" * length  # 0xc1 is never valid msgpack
    data[at + 16 : at + 16 + length] = payload
    struct.pack_into("<I", data, at + 12, zlib.crc32(payload))
    seg.write_bytes(bytes(data))
    before = seg.read_bytes()
    assert scan_segment(seg).damaged is True
    with pytest.raises(LogDamaged, match=r"valid checksum does not decode"):
        read_log(log, 0, repair=True)
    assert seg.read_bytes() == before
