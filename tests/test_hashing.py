"""Chunk hash algorithms: new saves use BLAKE3, stores written with SHA-256 (before the switch) stay
readable and verifiable, and a version may mix leaves named by both."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import blake3
import numpy as np
import pytest

from autosaved.codec import pack, unpack
from autosaved.errors import CorruptVersion
from autosaved.storage import hashing
from autosaved.storage.local import JobStore
from autosaved.storage.manifest import seal
from autosaved.tree import to_node

CHUNK = 64 * 1024


def write_old_store(js: JobStore, arr: np.ndarray) -> list[str]:
    """Version 1 exactly as autosaved wrote it before BLAKE3: SHA-256 chunk names, ``"hash": "sha256"`` in
    the manifest, no per-leaf hash. Built by hand, not by the current writer."""
    js.ensure_dirs()
    node, blobs = to_node(pack({"w": arr, "step": 3}))
    data = bytes(arr.data)
    digests = []
    for i in range(0, len(data), CHUNK):
        piece = data[i : i + CHUNK]
        digest = hashlib.sha256(piece).hexdigest()
        (js.objects_dir / digest[:2]).mkdir(exist_ok=True)
        (js.objects_dir / digest[:2] / digest).write_bytes(piece)
        digests.append(digest)
    sizes = [min(CHUNK, len(data) - i * CHUNK) for i in range(len(digests))]
    record = {**blobs[0].descriptor(), "chunks": [list(p) for p in zip(digests, sizes, strict=True)]}
    body = {"format": 1, "hash": "sha256", "job": js.job, "version": 1, "step": 3, "time": "2026-01-01T00:00:00Z",
            "reason": "test", "meta": {}, "bytes": len(data), "sessions": {}, "wal_lsn": 0, "tree": node,
            "blobs": [record]}
    (js.versions_dir / f"{1:012d}.json").write_bytes(seal(body))
    return digests


def test_new_saves_name_chunks_with_blake3(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "new")
    arr = np.arange(50_000, dtype=np.float32)
    js.write_version(pack({"w": arr}), version=1, step=1, reason="t", meta={}, sessions={}, chunk_size=CHUNK)
    doc = json.loads((js.versions_dir / f"{1:012d}.json").read_bytes())
    assert doc["hash"] == hashing.DEFAULT == "blake3"
    first = doc["blobs"][0]["chunks"][0]
    assert "hash" not in doc["blobs"][0]  # the manifest's own algorithm is not repeated per leaf
    assert first[0] == blake3.blake3(bytes(arr.data)[:CHUNK]).hexdigest()
    assert (js.objects_dir / first[0][:2] / first[0]).is_file()
    np.testing.assert_array_equal(unpack(js.load(1).tree)["w"], arr)


def test_old_sha256_store_reads_verifies_and_mixes_with_new_leaves(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "old")
    arr = np.random.default_rng(0).random(40_000, dtype=np.float32)  # 160 kB: three chunks
    old_digests = write_old_store(js, arr)
    loaded = js.load(1, verify=True)
    np.testing.assert_array_equal(unpack(loaded.tree)["w"], arr)
    assert js.verify(1).ok

    # The daemon's view after a restart: the old leaf by reference only, plus a new leaf from a client.
    lazy = js.load(1, load_data=False, verify=False).tree
    new = np.full(1000, 7, dtype=np.int64)
    tree = {**lazy, "new": pack({"n": new})["n"]}
    js.write_version(tree, version=2, step=4, reason="t", meta={}, sessions={}, chunk_size=CHUNK)
    doc = json.loads((js.versions_dir / f"{2:012d}.json").read_bytes())
    assert doc["hash"] == "blake3"
    by_chunk = {rec["chunks"][0][0]: rec for rec in doc["blobs"]}
    assert by_chunk[old_digests[0]]["hash"] == "sha256"  # the carried leaf keeps its algorithm
    assert [c[0] for c in by_chunk[old_digests[0]]["chunks"]] == old_digests
    out = unpack(js.load(2, verify=True).tree)
    np.testing.assert_array_equal(out["w"], arr)
    np.testing.assert_array_equal(out["new"], new)
    report = js.check()
    assert report["ok"] and [v["id"] for v in report["versions"]] == [1, 2]
    js.gc(keep_last=10, keep_every=None)
    assert all((js.objects_dir / d[:2] / d).is_file() for d in old_digests)  # still referenced

    # Verification uses the leaf's own algorithm: a flipped byte in an old chunk is caught.
    victim = js.objects_dir / old_digests[1][:2] / old_digests[1]
    raw = bytearray(victim.read_bytes())
    raw[10] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptVersion, match="does not match its hash"):
        js.load(2, verify=True)
    assert not js.verify(1).ok


def test_unknown_hash_algorithm_is_a_clear_error(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "odd")
    write_old_store(js, np.arange(10, dtype=np.float32))
    path = js.versions_dir / f"{1:012d}.json"
    doc = json.loads(path.read_bytes())
    doc.pop("digest")
    doc["hash"] = "md5"
    path.write_bytes(seal(doc))
    with pytest.raises(CorruptVersion, match="unknown chunk hash algorithm 'md5'"):
        js.load(1)
    assert not js.verify(1).ok


def test_bench_hash_reports_both_algorithms() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "autosaved", "bench", "hash", "--size", "16MiB", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["bytes"] == 16 * 1024**2
    for key in ("memcpy_gbps", "sha256_1_gbps", "sha256_2_gbps", "blake3_1_gbps", "blake3_2_gbps"):
        assert report[key] > 0, key
