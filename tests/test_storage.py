"""The local store on a real filesystem: atomic versions, dedup, retention, verification."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from autosaved.codec import pack
from autosaved.errors import CorruptVersion, InvalidJobName, NotFound
from autosaved.storage.local import JobStore, Store

CHUNK = 64 * 1024


def save(js: JobStore, state: dict[str | int, object], version: int, keep: int = 10) -> int:
    result = js.write_version(pack(state), version=version, step=version, reason="test", meta={}, sessions={},
                              chunk_size=CHUNK)
    js.apply_retention(keep, protect={version})
    return result.bytes_written


def test_unchanged_leaves_are_not_written_again(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "dedup")
    rng = np.random.default_rng(1)
    leaves = {f"layer{i}": rng.random(100_000, dtype=np.float32) for i in range(10)}
    first = save(js, leaves, 1)
    assert first >= 10 * 400_000
    leaves["layer3"] = rng.random(100_000, dtype=np.float32)
    second = save(js, leaves, 2)
    # only the changed leaf (400 kB) plus the manifest
    assert 400_000 <= second < 400_000 + 50_000
    # a change inside one chunk of a large leaf writes about one chunk
    big = {"w": rng.random(4 * 1024 * 1024 // 4, dtype=np.float32)}
    save(js, big, 3)
    big["w"] = big["w"].copy()
    big["w"][12345] = 1.0
    assert save(js, big, 4) < CHUNK + 50_000


def test_retention_keeps_last_n_and_collects_chunks(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "ret")
    for v in range(1, 6):
        save(js, {"x": np.full(1000, v), "same": np.arange(1000)}, v, keep=2)
    assert js.version_ids() == [4, 5]
    objects = [p for p in js.objects_dir.rglob("*") if p.is_file()]
    assert len(objects) == 3  # versions 1-3's own chunks were collected; the shared one stays
    assert (js.load(4).tree["x"].data is not None)


def test_torn_manifest_and_leftover_temps_are_harmless(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "torn")
    save(js, {"a": 1}, 1)
    # a crash between writing a temp and renaming it: the temp is garbage, version 1 is newest
    (js.tmp_dir / ".000000000002.json.abc.tmp").write_bytes(b'{"format": 1, "jo')
    assert js.version_ids() == [1]
    js.clean_tmp()
    assert list(js.tmp_dir.iterdir()) == []
    # a manifest cut short (a disk that lied about fsync) is detected, not loaded
    (js.versions_dir / "000000000002.json").write_bytes(b'{"format": 1, "jo')
    with pytest.raises(CorruptVersion):
        js.load(2)
    loaded = js.load_newest()
    assert loaded is not None and loaded.info.id == 1


def test_manifest_bit_flip_is_detected(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "flip")
    save(js, {"lr": 0.1, "step": 10}, 1)
    path = js.versions_dir / "000000000001.json"
    path.write_text(path.read_text().replace('"step": 1,', '"step": 7,'))
    with pytest.raises(CorruptVersion, match="digest"):
        js.load(1)


def test_missing_chunk_is_reported(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "miss")
    save(js, {"a": np.arange(10)}, 1)
    next(p for p in js.objects_dir.rglob("*") if p.is_file()).unlink()
    info = js.verify(1)
    assert not info.ok and "missing" in (info.error or "")
    assert js.load_newest() is None


def test_files_are_not_world_readable(tmp_path: Path) -> None:
    js = JobStore(tmp_path, 0, "perm")
    save(js, {"a": np.arange(10)}, 1)
    for p in js.path.rglob("*"):
        assert not os.stat(p).st_mode & 0o007, p


def test_store_lists_jobs_and_rejects_bad_names(tmp_path: Path) -> None:
    store = Store(tmp_path)
    save(store.job(1000, "a"), {"x": 1}, 1)
    save(store.job(1001, "b"), {"x": 1}, 1)
    assert [(j.owner, j.job) for j in store.jobs()] == [(1000, "a"), (1001, "b")]
    assert [j.job for j in store.jobs(1001)] == ["b"]
    with pytest.raises(InvalidJobName):
        store.job(0, "../escape")
    with pytest.raises(NotFound):
        store.job(1000, "a").load(9)
