"""One page/chunk store, two backends (issue 20 item 8): the local folder and a real SeaweedFS bucket read
versions through the one reader of :mod:`autosaved.storage.objects`, so a damaged or missing page or
chunk is reported the same way by both, and a restore by path from the bucket GETs O(log N) objects
(issue 20 item 5), counted on the store's own request counter while the bucket answers for real."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

from autosaved.codec import pack, unpack
from autosaved.errors import CorruptVersion, NotFound
from autosaved.state import merge
from autosaved.storage.local import JobStore
from autosaved.storage.objects import object_name
from autosaved.storage.remote import RemoteJob, RemoteStore
from autosaved.storage.upload import upload_version

CHUNK = 64 * 1024
JOB = "two"


def history(n: int) -> dict[str, Any]:
    """An agent's state: n small checkpoints (inline in pages) and one array stored as chunks."""
    return {"cp": {f"{i:08d}": {"msg": f"message {i} " * 20, "step": i} for i in range(n)},
            "w": np.arange(40_000, dtype=np.float32), "step": n}


def _save(js: JobStore, tree: Any, version: int) -> None:
    js.write_version(tree, version=version, step=version, reason="test", meta={}, sessions={}, chunk_size=CHUNK)


class Both:
    """A format-2 job saved locally and published to a fresh bucket prefix the way the daemon does."""

    def __init__(self, s3: Any, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        for k, v in s3.env.items():
            monkeypatch.setenv(k, v)
        self.url = s3.url(f"two-{secrets.token_hex(4)}")
        self.local = JobStore(root, os.geteuid(), JOB)
        self.local.write_format = 2
        self.known: dict[str, str] = {}
        writer = RemoteStore(self.url)
        self.writer = writer.job(os.geteuid(), JOB)
        self.lease = anyio.run(lambda: self.writer.acquire("test", 30.0))

    def publish(self, tree: Any, version: int) -> int:
        _save(self.local, tree, version)
        return anyio.run(lambda: upload_version(self.writer, self.local, version, self.lease, holder="test",
                                                ttl=30.0, known=self.known))

    def reader(self) -> RemoteJob:
        """A fresh client (its request counter at zero), as an offline restore on another host has."""
        return RemoteStore(self.url).job(os.geteuid(), JOB)

    def root(self, version: int) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.local.versions_dir / f"{version:012d}.json").read_bytes())
        return doc


def _without_location(exc: BaseException) -> str:
    """The message without its trailing ``(where the object lives)``: a path here, a key there."""
    return re.sub(r" \([^()]*\)$", "", str(exc))


def test_a_damaged_or_missing_page_or_chunk_reads_the_same_from_both(s3server: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    both = Both(s3server, tmp_path, monkeypatch)
    state = pack(history(300))
    both.publish(state, 1)
    root = both.root(1)["root"]
    chunk = unpack(both.local.load(1).tree)  # both read the same bytes while nothing is damaged
    remote = anyio.run(lambda: both.reader().load_version(1))
    assert remote is not None and unpack(remote.tree)["cp"] == chunk["cp"]
    w_digest = next(iter(both.local.leaf_records(1)))["chunks"][0][0]
    path = ("cp", "00000123")

    def failures() -> tuple[str, str, str]:
        with pytest.raises(CorruptVersion) as here:
            both.local.load_path(1, path)
        with pytest.raises(CorruptVersion) as there:
            anyio.run(lambda: both.reader().load_version(1, path=path))
        with pytest.raises(CorruptVersion) as whole:  # the bucket's concurrent whole-version download
            anyio.run(lambda: both.reader().load_version(1))
        return str(here.value), str(there.value), str(whole.value)

    async def put(name: str, data: bytes) -> None:
        await both.writer.store.put(both.writer.key(name), data)

    async def delete(name: str) -> None:
        await both.writer.store.delete([both.writer.key(name)])

    # A flipped byte in the root page, on disk and in the bucket.
    page = both.local.object_path(root)
    good = page.read_bytes()
    page.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    anyio.run(put, object_name(root), good[:-1] + bytes([good[-1] ^ 1]))
    here, there, whole = failures()
    assert f"{JOB} version 1: page {root[:16]}… does not match its hash" in here
    assert _without_location(here) == _without_location(there) == _without_location(whole)
    assert str(page) in here and both.writer.key(object_name(root)) in there
    # The page gone from both.
    page.unlink()
    anyio.run(delete, object_name(root))
    here, there, whole = failures()
    assert "is missing" in here and _without_location(here) == _without_location(there) == _without_location(whole)
    page.write_bytes(good)
    anyio.run(put, object_name(root), good)
    # A data chunk of the array damaged in both: a read of the array fails alike, one beside it does not.
    chunk_file = both.local.object_path(w_digest)
    bad = bytes(chunk_file.stat().st_size)
    chunk_file.write_bytes(bad)
    anyio.run(put, object_name(w_digest), bad)
    with pytest.raises(CorruptVersion) as here_w:
        both.local.load_path(1, ("w",))
    with pytest.raises(CorruptVersion) as there_w:
        anyio.run(lambda: both.reader().load_version(1, path=("w",)))
    assert f"chunk {w_digest[:16]}… does not match its hash" in str(here_w.value)
    assert _without_location(here_w.value) == _without_location(there_w.value)
    ok = anyio.run(lambda: both.reader().load_version(1, path=path))
    assert ok is not None and unpack(ok.tree) == unpack(both.local.load_path(1, path))
    with pytest.raises(NotFound):
        anyio.run(lambda: both.reader().load_version(1, path=("cp", "nope")))


def test_restore_by_path_from_the_bucket_gets_log_n_objects(s3server: Any, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    both = Both(s3server, tmp_path, monkeypatch)
    both.publish(pack(history(2500)), 1)
    doc = both.root(1)
    height = int(doc["height"])
    chunks = {d for rec in both.local.leaf_records(1) for d, _ in rec["chunks"]}  # the array's
    pages = len(both.local.objects.list("objects")) - len(chunks)
    assert height >= 2 and pages > 50  # a tree with interior pages: a path is a small part of it
    job = both.reader()
    got = anyio.run(lambda: job.load_version(None, path=("cp", "00001234")))
    assert got is not None and unpack(got.tree) == {"msg": "message 1234 " * 20, "step": 1234}
    # The lease and the root record, then one page per level: nothing else.
    assert job.store.requests["GET"] <= 2 + height + 1, job.store.requests
    job = both.reader()
    w = anyio.run(lambda: job.load_version(None, path=("w",)))
    assert w is not None and np.array_equal(unpack(w.tree), np.arange(40_000, dtype=np.float32))
    assert job.store.requests["GET"] <= 2 + height + 1 + len(chunks)  # plus the array's chunks
    # The whole version reads every page: what a path read saves.
    job = both.reader()
    anyio.run(lambda: job.load_version(None))
    assert job.store.requests["GET"] >= pages


def test_a_new_version_uploads_only_the_pages_and_chunks_the_bucket_lacks(
        s3server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    both = Both(s3server, tmp_path, monkeypatch)
    tree = pack(history(2500))
    first = both.publish(tree, 1)
    height = int(both.root(1)["height"])
    assert first > 50
    puts = both.writer.store.requests["PUT"]
    tree = merge(tree, pack({"cp": {"00001234": {"msg": "changed"}}, "step": 2501}))
    sent = both.publish(tree, 2)
    # One leaf page changed (maybe split in two), and the pages above it; the array's chunks are there.
    assert 1 <= sent <= 2 * (height + 1), sent
    # Those objects, the manifest (root record) last, and the lease renewed around it: nothing more.
    assert both.writer.store.requests["PUT"] - puts == sent + 1 + 2
    got = anyio.run(lambda: both.reader().load_version(2, path=("cp", "00001234", "msg")))
    assert got is not None and unpack(got.tree) == "changed"


def test_an_upload_reads_only_the_pages_a_save_changed(s3server: Any, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``complete`` (the replicator's: pages whose whole subtree the bucket holds), the upload of a
    version walks only its new pages, not every page of the state; without it, all of them."""
    both = Both(s3server, tmp_path, monkeypatch)
    complete: set[str] = set()
    tree = pack(history(2500))
    _save(both.local, tree, 1)
    anyio.run(lambda: upload_version(both.writer, both.local, 1, both.lease, holder="test", ttl=30.0,
                                     known=both.known, complete=complete))
    height = int(both.root(1)["height"])
    reads: list[str] = []
    real = both.local.objects.get

    def counting(name: str) -> bytes:
        reads.append(name)
        return real(name)

    both.local.objects.get = counting  # type: ignore[method-assign]
    for version in (2, 3):
        tree = merge(tree, pack({"cp": {f"{version * 700:08d}": {"msg": f"changed in {version}"}}}))
        _save(both.local, tree, version)
        reads.clear()
        sent = anyio.run(lambda v=version: upload_version(both.writer, both.local, v, both.lease, holder="test",
                                                          ttl=30.0, known=both.known, complete=complete))
        # The new root, the pages below it on the changed path (a leaf may split): each read once.
        assert 1 <= sent <= len(reads) <= 2 * (height + 1), (sent, len(reads))
        got = anyio.run(lambda v=version: both.reader().load_version(v, path=("cp", f"{v * 700:08d}", "msg")))
        assert got is not None and unpack(got.tree) == f"changed in {version}"
    # Without what the replicator learned (after a restart), an upload walks every page once again.
    tree = merge(tree, pack({"step": -1}))
    _save(both.local, tree, 4)
    reads.clear()
    anyio.run(lambda: upload_version(both.writer, both.local, 4, both.lease, holder="test", ttl=30.0,
                                     known=both.known, complete=set()))
    assert len(reads) > 50


def test_offline_restore_by_path_from_the_state_dir_and_the_bucket(s3server: Any, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``autosaved.restore(path=...)``, as ``Client.restore(path=...)``: the subtree, or ``None``."""
    import autosaved

    both = Both(s3server, tmp_path, monkeypatch)
    state = history(300)
    both.publish(pack(state), 1)
    for kw in ({"state_dir": tmp_path}, {"remote": both.url}, {"state_dir": tmp_path, "version": 1},
               {"remote": both.url, "version": 1}):
        assert autosaved.restore(JOB, path=["cp", "00000042"], **kw) == state["cp"]["00000042"], kw
        assert np.array_equal(autosaved.restore(JOB, path=["w"], **kw), state["w"]), kw
        assert autosaved.restore(JOB, path=["cp", "nope"], **kw) is None, kw
        assert autosaved.restore(JOB, path=["w", "deeper"], **kw) is None, kw


def test_remote_gc_fetches_each_shared_page_once(s3server: Any, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Remote collection marks from every kept root and does not descend into a page already marked: three
    versions sharing almost every page cost about one version's pages in GETs, not three."""
    both = Both(s3server, tmp_path, monkeypatch)
    tree = pack(history(2500))
    both.publish(tree, 1)
    for version in (2, 3):
        tree = merge(tree, pack({"cp": {f"{version * 700:08d}": {"msg": f"changed in {version}"}}}))
        both.publish(tree, version)
    chunks = {d for v in (1, 2, 3) for rec in both.local.leaf_records(v) for d, _ in rec["chunks"]}
    pages = len(both.local.objects.list("objects")) - len(chunks)  # every page of the three versions, once
    job = both.reader()
    result = anyio.run(lambda: job.collect(keep_last=10, keep_every=None, grace=3600.0))
    assert result.removed_chunks == 0 and result.deleted_versions == []
    # The lease, three root records, gc.json, and each distinct page once.
    assert pages <= job.store.requests["GET"] <= pages + 5, (pages, job.store.requests)
    # Listings: the root records before and after retention, and every object once (the chunks' index and
    # their sizes come from the same listing).
    assert job.store.requests["LIST"] == 3, job.store.requests


def test_both_backends_keep_one_object_contract(s3server: Any, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """get/put/exists/list/delete of named objects, and the create-only put, alike on the folder and the
    bucket (whose sync calls run from a worker thread, as the reader runs them)."""
    both = Both(s3server, tmp_path, monkeypatch)
    both.local.ensure_dirs()

    def contract(backend: Any) -> None:
        name = object_name("ab" * 32)
        assert not backend.exists(name)
        with pytest.raises(FileNotFoundError):
            backend.get(name)
        assert backend.put(name, b"one", create=True) is True
        assert backend.put(name, b"two", create=True) is False  # immutable: the first write stays
        assert bytes(backend.get(name)) == b"one" and backend.exists(name)
        into = memoryview(bytearray(3))
        backend.get_into(name, into)
        assert bytes(into) == b"one"
        with pytest.raises(OSError):
            backend.get_into(name, memoryview(bytearray(4)))
        assert backend.list("objects") == [name]
        backend.delete([name])
        assert not backend.exists(name) and backend.list("objects") == []

    contract(both.local.objects)
    anyio.run(lambda: anyio.to_thread.run_sync(contract, both.writer.objects))
