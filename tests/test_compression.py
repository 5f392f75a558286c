"""Chunk compression (policy.compression) on real files and through the real daemon: what is stored
compressed, that every reader gets the raw bytes back and still checks them, dedup across stored forms."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

import autosaved
from autosaved.codec import pack
from autosaved.config import PolicySettings
from autosaved.errors import ConfigError, CorruptVersion
from autosaved.shm import release_mapping
from autosaved.storage.compress import SUFFIX, is_float_blob
from autosaved.storage.local import JobStore
from autosaved.testing.private import PrivateDaemon
from autosaved.tree import Blob, to_node

from .conftest import NO_AUTO_POLICY
from .test_e2e import assert_state_equal

CHUNK = 64 * 1024
# The daemon's smallest chunk size, so a few MB of state spans many chunks.
SMALL_CHUNKS = 'chunk_size = "64KiB"\n' + NO_AUTO_POLICY


def compressible_state() -> dict[str | int, Any]:
    """What a trainer's non-float state looks like: token ids, a step counter array, a text log."""
    # No two chunks alike, so the sizes below measure compression, not dedup inside one state.
    return {
        "positions": np.arange(512 * 1024, dtype=np.int64) // 3,  # 4 MiB
        "mask": np.random.default_rng(7).random(256 * 1024) < 0.05,  # bool
        "log": b"".join(b"step=%d loss=%.4f lr=3e-4\n" % (i, 1 / (i + 1)) for i in range(20_000)),
    }


def random_floats(seed: int = 0) -> dict[str | int, Any]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(512 * 1024, dtype=np.float32), "m": rng.random(128 * 1024)}


def save(js: JobStore, state: dict[str | int, Any], version: int, compression: str) -> int:
    result = js.write_version(pack(state), version=version, step=version, reason="test", meta={}, sessions={},
                              chunk_size=CHUNK, compression=compression)
    return result.bytes_written


def stored_objects(js: JobStore) -> tuple[list[Path], list[Path]]:
    """(raw, compressed) chunk files of a job."""
    files = [p for p in js.objects_dir.rglob("*") if p.is_file()]
    return [p for p in files if p.suffix != SUFFIX], [p for p in files if p.suffix == SUFFIX]


def raw_size(state: dict[str | int, Any]) -> int:
    _, blobs = to_node(pack(state))
    return sum(b.nbytes for b in blobs)


def assert_restores(js: JobStore, version: int, want: dict[str | int, Any]) -> None:
    assert_state_equal(autosaved.restore(js.job, state_dir=js.path.parents[2], version=version), want)


# -- the store ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "zstd"])
def test_compressible_state_writes_far_fewer_bytes_and_round_trips(tmp_path: Path, mode: str) -> None:
    state = compressible_state()
    off = JobStore(tmp_path, 0, "off")
    on = JobStore(tmp_path, 0, f"on-{mode}")
    written_off = save(off, state, 1, "off")
    written_on = save(on, state, 1, mode)
    assert written_off >= raw_size(state)
    assert written_on < written_off / 4, (written_on, written_off)
    assert stored_objects(off)[1] == []
    raw, packed = stored_objects(on)
    assert packed and not raw
    assert on.stored_bytes() == sum(p.stat().st_size for p in packed) < off.stored_bytes() / 4
    assert_restores(on, 1, state)
    assert on.verify(1).ok


def test_auto_never_tries_float_data_and_zstd_keeps_only_chunks_that_shrink(tmp_path: Path) -> None:
    noise = random_floats()
    zeros = {"z": np.zeros(256 * 1024, dtype=np.float32)}  # floats that would shrink, to tell "not tried" apart
    auto = JobStore(tmp_path, 0, "auto")
    written = save(auto, {**noise, **zeros}, 1, "auto")
    assert written >= raw_size(noise) + CHUNK  # the zeros are 16 identical chunks: one is stored, raw
    assert stored_objects(auto)[1] == []  # auto: no float chunk was even tried
    assert_restores(auto, 1, {**noise, **zeros})

    forced = JobStore(tmp_path, 0, "zstd")
    save(forced, noise, 1, "zstd")
    assert stored_objects(forced)[1] == []  # random floats never shrink by 10%: stored raw
    save(forced, zeros, 2, "zstd")
    raw, packed = stored_objects(forced)
    assert len(packed) == 1 and len(raw) == raw_size(noise) // CHUNK  # the zeros: one chunk, and it shrinks
    assert_restores(forced, 1, noise)
    assert_restores(forced, 2, zeros)


def test_float_dtypes_are_recognised() -> None:
    def blob(kind: str, dtype: str) -> Blob:
        return Blob(kind=kind, dtype=dtype, shape=(1,), nbytes=8)

    floats = [("ndarray", "<f4"), ("ndarray", "<f2"), ("ndarray", "<c16"), ("torch", "bfloat16"),
              ("torch", "float8_e4m3fn"), ("torch", "complex64"), ("torch", "float32")]
    others = [("bytes", "bytes"), ("ndarray", "<i8"), ("ndarray", "|b1"), ("ndarray", "|u1"), ("torch", "int64"),
              ("torch", "bool"), ("torch", "uint8")]
    assert all(is_float_blob(blob(k, d)) for k, d in floats)
    assert not any(is_float_blob(blob(k, d)) for k, d in others)


def test_dedup_and_restore_across_stored_forms(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "mixed")
    state = compressible_state()
    first = save(js, state, 1, "off")
    # the same bytes under zstd: every chunk exists (raw) already, so only the manifest is written
    assert save(js, state, 2, "zstd") < 20_000 < first
    state["extra"] = np.arange(100_000, dtype=np.int32)
    save(js, state, 3, "zstd")
    raw, packed = stored_objects(js)
    assert raw and packed
    # and back: chunks stored compressed are found by their raw digest when compression is off
    state2 = {**state, "more": b"x" * 100}
    assert save(js, state2, 4, "off") < 20_000
    for vid, want in ((1, compressible_state()), (3, state), (4, state2)):
        assert_restores(js, vid, want)
        assert js.verify(vid).ok
    # a lazily loaded base (the daemon's, after a restart) saves again without reading its chunks
    base = js.load(4, load_data=False)
    assert js.write_version(base.tree, version=5, step=5, reason="test", meta={}, sessions={}, chunk_size=CHUNK,
                            compression="zstd").chunks_written == 0
    assert_restores(js, 5, state2)


def test_retention_collects_compressed_chunks_and_keeps_referenced_ones(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "gc")
    for v in range(1, 5):
        save(js, {"x": np.full(100_000, v, dtype=np.int64), "same": np.arange(100_000)}, v, "zstd")
        js.apply_retention(2, protect={v})
    assert js.version_ids() == [3, 4]
    raw, packed = stored_objects(js)
    referenced = js.referenced_digests()
    assert referenced is not None
    assert {p.name.removesuffix(SUFFIX) for p in raw + packed} == referenced
    assert all(js.verify(v).ok for v in (3, 4))


def _chunk_files(js: JobStore, version: int) -> list[Path]:
    doc = js.read_manifest(version)
    digests = [d for rec in doc["blobs"] for d, _ in rec["chunks"]]
    return [js.objects_dir / d[:2] / (d + SUFFIX) for d in digests]


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _wrong_frame(path: Path) -> None:
    """A valid frame of the right size but of other bytes: only the raw-bytes hash can catch it."""
    size = len(zstandard.ZstdDecompressor().decompress(path.read_bytes()))
    path.write_bytes(zstandard.ZstdCompressor().compress(b"\0" * size))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("damage", [_flip, _wrong_frame, _truncate, Path.unlink], ids=lambda f: f.__name__)
def test_damaged_compressed_chunk_is_reported_by_every_reader(tmp_path: Path, damage: Callable[[Path], None]) -> None:
    js = JobStore(tmp_path, 0, "bad")
    save(js, {"tokens": np.arange(200_000, dtype=np.int64) % 1000}, 1, "zstd")
    target = next(p for p in _chunk_files(js, 1) if p.exists())
    damage(target)
    with pytest.raises(CorruptVersion, match="bad version 1: chunk"):
        js.load(1)
    info = js.verify(1)
    assert not info.ok and info.error and "chunk" in info.error
    lazy = js.load(1, load_data=False, verify=False)
    (blob,) = to_node(lazy.tree)[1]
    with pytest.raises(CorruptVersion):
        js.read_blob(blob)
    with pytest.raises(CorruptVersion):
        send(js, blob)


def send(js: JobStore, blob: Blob) -> bytes:
    """What the daemon's shared-memory restore does with a stored blob: sendfile/pwrite into a memfd."""
    fd = os.memfd_create("test-restore", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, blob.nbytes + 4096)
        mapping = mmap.mmap(fd, blob.nbytes + 4096, flags=mmap.MAP_SHARED)
        try:
            js.send_blob(blob, fd, 4096, mapping)
            return bytes(mapping[4096:])
        finally:
            release_mapping(mapping)  # as the daemon does: a failed send may leave views behind
    finally:
        os.close(fd)


def test_send_blob_mixes_raw_and_compressed_chunks(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "send")
    half = np.arange(128 * 1024, dtype=np.int64) % 100  # 1 MiB, compresses
    save(js, {"a": half}, 1, "zstd")
    noisy = np.concatenate([half, np.random.default_rng(3).integers(0, 2**62, 128 * 1024)])
    save(js, {"a": noisy}, 2, "zstd")  # the first half's chunks are reused (compressed), the noise stays raw
    raw, packed = stored_objects(js)
    assert raw and packed
    (blob,) = to_node(js.load(2, load_data=False).tree)[1]
    assert send(js, blob) == noisy.tobytes()


# -- configuration --------------------------------------------------------------------------------


def test_policy_compression_setting() -> None:
    assert PolicySettings().compression == "auto"
    assert PolicySettings.parse({"compression": "off"}).compression == "off"
    assert PolicySettings.parse({"compression": "zstd"}, base=PolicySettings()).to_wire()["compression"] == "zstd"
    for bad in ("gzip", "ZSTD", True, 3, None):
        with pytest.raises(ConfigError, match=r"policy\.compression: expected one of 'off', 'zstd', 'auto'"):
            PolicySettings.parse({"compression": bad})


# -- through the daemon ---------------------------------------------------------------------------


def _status_bytes(d: PrivateDaemon, job: str, policy: dict[str, Any] | None) -> int:
    with autosaved.Client(job, address=d.address, policy=policy) as c:
        c.update(compressible_state(), step=1)
        c.save()
        written: int = c.status()["bytes_written"]
    return written


def test_daemon_compresses_per_job_policy_and_restores(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(SMALL_CHUNKS)
    default = _status_bytes(d, "auto", None)
    off = _status_bytes(d, "off", {"compression": "off"})
    assert off >= raw_size(compressible_state())
    assert default < off / 4, (default, off)
    with autosaved.Client("floats", address=d.address) as c:
        c.update(random_floats(), step=1)
        c.save()
        assert c.status()["bytes_written"] >= raw_size(random_floats())
    # a restarted daemon holds a lazy base: restores read the stored chunks (the shared-memory path for
    # the bulk leaves, inline frames for the small ones) and must give the exact bytes back
    d.stop()
    d.start()
    for job in ("auto", "off"):
        with autosaved.Client(job, address=d.address) as c:
            assert_state_equal(c.restore(), compressible_state())
            assert_state_equal(c.restore(version=1), compressible_state())
        assert_state_equal(autosaved.restore(job, state_dir=d.state_dir), compressible_state())
    with autosaved.Client("floats", address=d.address) as c:
        assert_state_equal(c.restore(), random_floats())


def test_daemon_mixed_versions_dedup_and_corruption_is_caught(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(SMALL_CHUNKS)
    state = compressible_state()
    with autosaved.Client("mix", address=d.address, policy={"compression": "off"}) as c:
        c.update(state, step=1)
        assert c.save() == 1
    with autosaved.Client("mix", address=d.address, policy={"compression": "zstd"}) as c:
        assert c.status()["policy"]["compression"] == "zstd"
        before = c.status()["bytes_written"]
        new_leaf = {"ids": np.arange(300_000, dtype=np.int32) % 17}
        c.update(new_leaf, step=2)
        assert c.save() == 2
        # only the new leaf, compressed, and the manifest: the unchanged chunks were stored raw by version 1
        assert c.status()["bytes_written"] - before < 100_000
    js = JobStore(d.state_dir, os.geteuid(), "mix")
    raw, packed = stored_objects(js)
    assert raw and packed
    d.stop()
    d.start()
    want = {**state, **new_leaf}
    with autosaved.Client("mix", address=d.address) as c:
        assert_state_equal(c.restore(), want)
        assert_state_equal(c.restore(version=1), state)
        _flip(packed[0])
        with pytest.raises(autosaved.CorruptVersion):
            c.restore(version=2)
        assert_state_equal(c.restore(version=1), state)  # version 1 never used the compressed chunk


def test_torch_tensors_follow_the_same_rule(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    ints = torch.arange(300_000, dtype=torch.int64) // 5
    floats = torch.zeros(10 * CHUNK // 2, dtype=torch.bfloat16)  # would shrink, but auto never tries floats
    js = JobStore(tmp_path, 0, "torch")
    save(js, {"ints": ints}, 1, "auto")
    assert stored_objects(js)[1] and not stored_objects(js)[0]
    save(js, {"ints": ints, "floats": floats}, 2, "auto")
    assert len(stored_objects(js)[0]) == 1  # the bfloat16 zeros: identical chunks, one stored raw
    got = autosaved.restore("torch", state_dir=tmp_path, version=2, tensors="torch")
    assert torch.equal(got["ints"], ints) and torch.equal(got["floats"], floats)
    assert got["floats"].dtype == torch.bfloat16
