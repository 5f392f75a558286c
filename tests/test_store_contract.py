"""One contract, two stores (litestream's habit): every test here runs against the local store (a state
dir) and the S3 store (a real SeaweedFS bucket, filled the way the daemon fills it: a local save, then
``upload_version`` under a lease).

What both must do alike: versions come back byte-exact with their step and meta; an unknown id is
``NotFound``; a chunk changed or gone makes that version ``CorruptVersion`` naming the chunk, and "the newest"
falls back to the newest older version that verifies, reporting the one it skipped; a version that reuses
leaves stores no second copy of them; zstd chunks round-trip; retention keeps the newest ``keep_last`` and
collection then drops exactly the chunks no kept version references.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import anyio
import numpy as np
import pytest

from autosaved.codec import pack, unpack
from autosaved.errors import CorruptVersion, NotFound
from autosaved.storage.local import JobStore
from autosaved.storage.manifest import VersionInfo

JOB = "contract"
CHUNK = 64 * 1024


class StoreUnderTest(Protocol):
    """The contract's view of a store: sync calls, one job."""

    def publish(self, state: dict[str, Any], version: int, *, compression: str = "off") -> None: ...
    def ids(self) -> list[int]: ...
    def infos(self) -> list[VersionInfo]: ...
    def load(self, version: int) -> Any: ...
    def newest(self, on_skip: Callable[[CorruptVersion], None]) -> tuple[int, Any] | None: ...
    def chunks(self) -> set[str]: ...  # digests of the chunk objects stored
    def damage(self, digest: str, *, remove: bool) -> None: ...
    def retain(self, keep_last: int) -> list[int]: ...  # retention then collection; the deleted ids


def _write(js: JobStore, state: dict[str, Any], version: int, compression: str) -> None:
    js.write_version(pack(state), version=version, step=version * 10, reason="test", meta={"v": version},
                     sessions={}, chunk_size=CHUNK, compression=compression)


def _chunk_files(js: JobStore) -> dict[str, Path]:
    if not js.objects_dir.is_dir():
        return {}
    return {p.name.removesuffix(".zst"): p for p in js.objects_dir.glob("*/*")}


class LocalUnderTest:
    def __init__(self, root: Path) -> None:
        self.js = JobStore(root, os.geteuid(), JOB)

    def publish(self, state: dict[str, Any], version: int, *, compression: str = "off") -> None:
        _write(self.js, state, version, compression)

    def ids(self) -> list[int]:
        return self.js.version_ids()

    def infos(self) -> list[VersionInfo]:
        return self.js.list_versions(verify=False)

    def load(self, version: int) -> Any:
        return unpack(self.js.load(version).tree)

    def newest(self, on_skip: Callable[[CorruptVersion], None]) -> tuple[int, Any] | None:
        loaded = self.js.load_newest(on_skip=on_skip)
        return None if loaded is None else (loaded.info.id, unpack(loaded.tree))

    def chunks(self) -> set[str]:
        return set(_chunk_files(self.js))

    def damage(self, digest: str, *, remove: bool) -> None:
        path = _chunk_files(self.js)[digest]
        if remove:
            path.unlink()
        else:
            path.write_bytes(bytes(path.stat().st_size))

    def retain(self, keep_last: int) -> list[int]:
        return self.js.apply_retention(keep_last, protect=set())


class RemoteUnderTest:
    def __init__(self, s3: Any, root: Path) -> None:
        from autosaved.storage.remote import RemoteStore

        self.host = JobStore(root, os.geteuid(), JOB)  # the daemon's local store, before each upload
        self.store = RemoteStore(s3.url(f"contract-{secrets.token_hex(4)}"))
        self.job = self.store.job(os.geteuid(), JOB)
        self.lease = anyio.run(lambda: self.job.acquire("contract-test", 30.0))
        self.known: dict[str, str] = {}

    def publish(self, state: dict[str, Any], version: int, *, compression: str = "off") -> None:
        from autosaved.storage.upload import upload_version

        _write(self.host, state, version, compression)
        anyio.run(lambda: upload_version(self.job, self.host, version, self.lease, holder="contract-test",
                                         ttl=30.0, known=self.known))

    def ids(self) -> list[int]:
        return [vk.id for vk in anyio.run(self.job.visible_versions)]

    def infos(self) -> list[VersionInfo]:
        return anyio.run(self.job.list_versions)

    def load(self, version: int) -> Any:
        loaded = anyio.run(lambda: self.job.load_version(version))
        assert loaded is not None
        return unpack(loaded.tree)

    def newest(self, on_skip: Callable[[CorruptVersion], None]) -> tuple[int, Any] | None:
        loaded = anyio.run(lambda: self.job.load_version(None, on_skip))
        return None if loaded is None else (loaded.info.id, unpack(loaded.tree))

    def chunks(self) -> set[str]:
        return set(anyio.run(self.job.chunk_index))

    def damage(self, digest: str, *, remove: bool) -> None:
        key, _ = anyio.run(self.job.chunk_index)[digest]
        if remove:
            anyio.run(lambda: self.store.delete([key]))
        else:
            anyio.run(lambda: self.store.put(key, bytes(1000)))

    def retain(self, keep_last: int) -> list[int]:
        # grace 0: nothing is in flight here, so an unreferenced chunk may go at once.
        result = anyio.run(lambda: self.job.collect(keep_last=keep_last, keep_every=None, grace=0.0,
                                                    lease=self.lease))
        self.known = {d: k for d, (k, _) in anyio.run(self.job.chunk_index).items()}
        return result.deleted_versions


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[StoreUnderTest]:
    if request.param == "local":
        yield LocalUnderTest(tmp_path)
        return
    s3 = request.getfixturevalue("s3server")
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    yield RemoteUnderTest(s3, tmp_path)


def _state(seed: int, n: int = 40_000) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(n).astype(np.float32), "b": rng.integers(0, 9, 300, dtype=np.int64),
            "meta": {"name": f"s{seed}", 7: (1, 2.5, None)}, "raw": bytes(range(256)) * 3}


def _same(a: Any, b: Any) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k]


def test_versions_round_trip_with_their_info(store: StoreUnderTest) -> None:
    for v in (1, 2):
        store.publish(_state(v), v)
    assert store.ids() == [1, 2]
    _same(store.load(1), _state(1))
    _same(store.load(2), _state(2))
    infos = store.infos()
    assert [(i.id, i.step, i.meta, i.reason) for i in infos] == [(1, 10, {"v": 1}, "test"), (2, 20, {"v": 2}, "test")]
    assert all(i.bytes > 160_000 for i in infos)
    with pytest.raises(NotFound):
        store.load(3)


def test_a_changed_or_missing_chunk_is_detected_and_the_newest_falls_back(store: StoreUnderTest) -> None:
    for v in (1, 2, 3):
        store.publish(_state(v), v)
    store.publish(_state(3), 4)  # the same content as version 3: it stores nothing new, shares every chunk
    assert _chunks_of(store, 4) == _chunks_of(store, 3)
    c1, c2, c3 = (_chunks_of(store, v) for v in (1, 2, 3))
    changed, missing = sorted(c3 - c2 - c1)[0], sorted(c2 - c1 - c3)[0]
    store.damage(changed, remove=False)
    store.damage(missing, remove=True)
    skipped: list[CorruptVersion] = []
    got = store.newest(skipped.append)
    assert got is not None and got[0] == 1
    _same(got[1], _state(1))
    assert len(skipped) == 3  # 4 and 3 (the changed chunk), 2 (the missing one), newest first
    assert changed[:16] in str(skipped[0]) and changed[:16] in str(skipped[1]) and missing[:16] in str(skipped[2])
    for v in (2, 3, 4):
        with pytest.raises(CorruptVersion):
            store.load(v)


def _chunks_of(store: StoreUnderTest, version: int) -> set[str]:
    """The chunks a version references, as the difference it made to an otherwise unchanged store."""
    if isinstance(store, LocalUnderTest):
        doc = store.js.read_manifest(version)
    else:
        assert isinstance(store, RemoteUnderTest)
        vk = next(vk for vk in anyio.run(store.job.visible_versions) if vk.id == version)
        doc = anyio.run(lambda: store.job.read_manifest(vk))
    return {str(d) for rec in doc["blobs"] for d, _ in rec["chunks"]}


def test_reused_leaves_are_stored_once_and_zstd_chunks_round_trip(store: StoreUnderTest) -> None:
    base = _state(1)
    store.publish(base, 1, compression="zstd")
    first = store.chunks()
    changed = {**base, "b": base["b"] + 1}  # one small leaf changes; the big one is reused
    store.publish(changed, 2, compression="zstd")
    added = store.chunks() - first
    assert len(added) == 1 and added <= _chunks_of(store, 2)
    zeros = {"z": np.zeros(300_000, dtype=np.float64)}  # compresses to almost nothing
    store.publish(zeros, 3, compression="zstd")
    _same(store.load(1), base)
    _same(store.load(2), changed)
    _same(store.load(3), zeros)


def test_retention_keeps_the_newest_and_collection_drops_only_unreferenced_chunks(store: StoreUnderTest) -> None:
    for v in (1, 2, 3):
        store.publish(_state(v), v)
    kept = _chunks_of(store, 3)
    assert store.retain(1) == [1, 2]
    assert store.ids() == [3]
    assert store.chunks() == kept
    _same(store.load(3), _state(3))
    with pytest.raises(NotFound):
        store.load(1)
