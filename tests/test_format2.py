"""Format 2 in the local store on a real filesystem: a version is a root record over pages; a save writes
the changed pages and leaves only; reads by path read the pages on the path; gc marks from every root."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autosaved.codec import pack, unpack
from autosaved.errors import CorruptVersion, NotFound
from autosaved.state import counted, merge
from autosaved.storage import paged
from autosaved.storage.local import JobStore
from autosaved.tree import DELETE, Replace

CHUNK = 64 * 1024


def store(root: Path, job: str = "f2") -> JobStore:
    js = JobStore(root, os.geteuid(), job)
    js.write_format = 2
    return js


def save(js: JobStore, tree: Any, version: int, keep: int = 10) -> int:
    result = js.write_version(tree, version=version, step=version, reason="test", meta={"v": version},
                              sessions={"s": version}, chunk_size=CHUNK, wal_lsn=version)
    js.apply_retention(keep, protect={version})
    return result.bytes_written


def history(n: int) -> dict[str, Any]:
    """An agent's state: n checkpoints of ~1 KB each (small values: inline in pages)."""
    return {"cp": {f"{i:08d}": {"msg": f"message {i} " * 60, "step": i} for i in range(n)}, "step": n}


def test_round_trip_with_info_and_every_leaf_kind(tmp_path: Path) -> None:
    js = store(tmp_path)
    state = {"w": np.arange(100_000, dtype=np.float32), "small": b"\x00\x01", 3: (1, "x", [None, 2.5]),
             "nan": float("nan"), "big": 2**70, "e": {}, "z": 1, "a": 2}
    save(js, pack(state), 1)
    doc = json.loads((js.versions_dir / "000000000001.json").read_bytes())
    assert doc["format"] == 2 and "tree" not in doc and len(doc["root"]) == 64 and doc["wal_lsn"] == 1
    loaded = js.load(1)
    back = unpack(loaded.tree)
    assert list(back) == list(state) and back[3] == (1, "x", [None, 2.5]) and back["big"] == 2**70
    assert np.array_equal(back["w"], state["w"]) and bytes(back["small"]) == b"\x00\x01"
    assert loaded.info.step == 1 and loaded.info.meta == {"v": 1} and loaded.sessions == {"s": 1}
    assert loaded.info.bytes == 400_002 and js.verify(1).ok


def test_a_save_writes_what_changed_not_the_history(tmp_path: Path) -> None:
    js = store(tmp_path)
    tree = pack(history(10_000))  # ~10 MB of history in pages
    first = save(js, tree, 1)
    assert first > 8_000_000
    # 100 new checkpoints (~100 KB), merged as the daemon merges (only the changed paths are new objects)
    delta = pack({"cp": {f"{i:08d}": {"msg": f"message {i} " * 60, "step": i} for i in range(10_000, 10_100)},
                  "step": 10_100})
    tree = merge(tree, delta)
    second = save(js, tree, 2)
    assert second < 3 * 110_000, second
    # one changed value deep inside: one leaf page and the interior pages above it
    tree = merge(tree, {"cp": {"00005000": {"step": -1}}})
    assert save(js, tree, 3) < 3 * 16384 + 4096
    assert unpack(js.load(3).tree)["cp"]["00005000"]["step"] == -1


def test_the_same_state_gives_the_same_root_whatever_its_history(tmp_path: Path) -> None:
    a, b = store(tmp_path, "a"), store(tmp_path, "b")
    save(a, pack(history(3000)), 1)
    tree = pack({"cp": {}, "step": 0})
    save(b, tree, 1)
    for lo in range(0, 3000, 1000):  # built up in three saves, with a detour
        tree = merge(tree, pack({"cp": {f"{i:08d}": {"msg": f"message {i} " * 60, "step": i}
                                        for i in range(lo, lo + 1000)}, "junk": lo}))
        save(b, tree, lo + 2)
    tree = merge(tree, pack({"step": 3000, "junk": None}))
    tree = {k: v for k, v in tree.items() if k != "junk"}
    save(b, tree, 9)
    root = lambda js, v: json.loads((js.versions_dir / f"{v:012d}.json").read_bytes())["root"]  # noqa: E731
    assert root(a, 1) == root(b, 9)


def test_a_path_reads_only_the_pages_on_it(tmp_path: Path) -> None:
    js = store(tmp_path)
    save(js, pack(history(20_000)), 1)
    reads: list[str] = []
    real = js.objects.get

    def counting(name: str) -> bytes:  # every object the reader gets from the job's folder
        reads.append(name)
        return real(name)

    js.objects.get = counting  # type: ignore[method-assign]
    got = unpack(js.load_path(1, ("cp", "00012345")))
    assert got == {"msg": "message 12345 " * 60, "step": 12345}
    doc = json.loads((js.versions_dir / "000000000001.json").read_bytes())
    assert len(reads) <= doc["height"] + 2
    with pytest.raises(NotFound):
        js.load_path(1, ("cp", "nope"))


def test_gc_marks_from_every_root_and_keeps_shared_pages(tmp_path: Path) -> None:
    js = store(tmp_path)
    tree = pack(history(2000))
    for v in range(1, 6):
        tree = merge(tree, pack({"cp": {f"{v:08d}": {"msg": f"changed in {v}"}}, "w": np.full(1000, v)}))
        save(js, tree, v, keep=2)
    assert js.version_ids() == [4, 5]
    refs = js.referenced_digests()
    assert refs is not None
    files = {p.name for p in js.objects_dir.rglob("*") if p.is_file()}
    assert files == refs  # nothing unreferenced left, nothing referenced missing
    for v in (4, 5):
        assert js.verify(v).ok
    assert unpack(js.load(4).tree)["w"][0] == 4


def test_a_damaged_or_missing_page_is_corrupt_and_the_newest_falls_back(tmp_path: Path) -> None:
    js = store(tmp_path)
    save(js, pack({"a": 1}), 1)
    tree = pack(history(500))
    save(js, tree, 2)
    doc = json.loads((js.versions_dir / "000000000002.json").read_bytes())
    page = js.object_path(doc["root"])
    page.write_bytes(page.read_bytes()[:-1] + b"!")
    with pytest.raises(CorruptVersion, match="does not match its hash"):
        js.load(2)
    assert not js.verify(2).ok
    assert js.referenced_digests() is None  # gc must not run over an unreadable version
    loaded = js.load_newest()
    assert loaded is not None and loaded.info.id == 1
    page.unlink()
    with pytest.raises(CorruptVersion, match="missing"):
        js.load(2)


def test_a_new_store_object_diffs_against_the_loaded_version(tmp_path: Path) -> None:
    """After a restart the daemon loads the newest version lazily; its next save writes only the change (a
    full diff of the state once, its pages found already stored), and the one after diffs by identity."""
    js = store(tmp_path)
    save(js, pack(history(5000)), 1)
    again = store(tmp_path)
    loaded = again.load(1, load_data=False)
    tree = merge(counted(loaded.tree), pack({"step": 1}))  # as the daemon holds it: counted mappings
    assert save(again, tree, 2) < 3 * 16384 + 4096
    assert unpack(again.load(2).tree) == {**history(5000), "step": 1}
    tree = merge(tree, pack({"cp": {"00000007": {"step": 70}}}))
    assert save(again, tree, 3) < 3 * 16384 + 4096


def test_a_format_1_version_is_followed_by_format_2(tmp_path: Path) -> None:
    js = JobStore(tmp_path, os.geteuid(), "mixed")
    save(js, pack({"w": np.arange(1000), "a": {"b": 1}}), 1)
    js2 = store(tmp_path, "mixed")
    base = js2.load(1, load_data=False).tree
    save(js2, merge(base, pack({"a": {"c": 2}})), 2)
    formats = [json.loads((js2.versions_dir / f"{v:012d}.json").read_bytes())["format"] for v in (1, 2)]
    assert formats == [1, 2]
    back = unpack(js2.load(2).tree)
    assert np.array_equal(back["w"], np.arange(1000)) and back["a"] == {"b": 1, "c": 2}
    refs = js2.referenced_digests()
    assert refs is not None and {p.name for p in js2.objects_dir.rglob("*") if p.is_file()} <= refs
    assert paged.FORMAT == 2


def test_format_2_replicates_restores_seeds_and_collects_in_a_bucket(tmp_path: Path, s3server: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SeaweedFS bucket: a format-2 version goes up as its new pages and chunks, then its root
    record; it loads back exactly, seeds a fresh host, a damaged page is named, and gc keeps exactly the
    pages and chunks of the kept versions."""
    import secrets

    import anyio

    from autosaved.storage.remote import RemoteStore
    from autosaved.storage.upload import upload_version

    for k, v in s3server.env.items():
        monkeypatch.setenv(k, v)
    host = store(tmp_path / "host", "r")
    remote = RemoteStore(s3server.url(f"f2-{secrets.token_hex(4)}")).job(os.geteuid(), "r")
    lease = anyio.run(lambda: remote.acquire("f2-test", 30.0))
    known: dict[str, str] = {}
    tree = pack({**history(1500), "w": np.arange(50_000, dtype=np.int64)})
    sent = []
    for v in (1, 2, 3):
        tree = merge(tree, pack({"cp": {f"x{v}": {"msg": "new"}}, "step": v}))
        save(host, tree, v)
        sent.append(anyio.run(lambda v=v: upload_version(remote, host, v, lease, holder="f2-test", ttl=30.0,
                                                         known=known)))
    assert sent[1] < sent[0] / 4  # the second version sent only its changed pages
    loaded = anyio.run(lambda: remote.load_version(3))
    assert loaded is not None
    got, want = unpack(loaded.tree), unpack(host.load(3).tree)
    assert np.array_equal(got.pop("w"), want.pop("w")) and got == want
    fresh = store(tmp_path / "fresh", "r")
    assert anyio.run(lambda: remote.seed(fresh)) == 3
    assert fresh.verify(3).ok and unpack(fresh.load(3).tree)["step"] == 3
    gc = anyio.run(lambda: remote.collect(keep_last=1, keep_every=None, grace=0.0, lease=lease))
    assert gc.deleted_versions == [1, 2]
    kept = {p.name for p in fresh.objects_dir.rglob("*") if p.is_file()}
    gc = anyio.run(lambda: remote.collect(keep_last=1, keep_every=None, grace=0.0, lease=lease))  # past grace
    assert set(anyio.run(remote.chunk_index)) == kept
    root = json.loads((host.versions_dir / "000000000003.json").read_bytes())["root"]
    key, _ = anyio.run(remote.chunk_index)[root]
    anyio.run(lambda: remote.store.put(key, b"not the page"))
    with pytest.raises(CorruptVersion, match="does not match its hash"):
        anyio.run(lambda: remote.load_version(3))


def test_a_save_of_the_changed_paths_gives_the_root_a_full_build_gives(tmp_path: Path) -> None:
    """The daemon's way: merges with generations, the paths each changed recorded before it (state.touch),
    each save given them; every version's root is the one a save from scratch of the same state gives, and a
    save given paths relative to another version than the store's last (a failed save's) is still right."""
    from autosaved.state import Touched, merge_counted, touch

    live, full = store(tmp_path / "live"), store(tmp_path / "full")
    root = counted(pack(history(300)))
    touched, base, gen = Touched(), None, 1
    deltas = [{"cp": {f"{300 + i:08d}": {"msg": f"new {i}", "step": i}}, "step": i} for i in range(6)]
    deltas += [{"cp": {"00000005": None, "00000007": {"msg": "changed"}}}, {"cp": {"00000000": DELETE}},
               {"cp": {"00000000": {"msg": "back, last"}}, "x": {"a": np.arange(3)}}]
    for version, raw in enumerate(deltas, start=1):
        delta = pack(raw, allow_delete=True)
        if "x" in delta:
            delta["x"] = Replace(delta["x"])
        touch(touched, root, delta)
        root = merge_counted(root, delta, gen).root
        gen += 1
        changed = (base, touched) if base is not None else None
        if version == 4:
            changed = (base - 1, touched) if base is not None else None  # relative to an older tree: ignored
        live.write_version(root, version=version, step=version, reason="t", meta={}, sessions={},
                           chunk_size=CHUNK, changed=changed)
        full.paged_cache = None
        full.write_version(root, version=version, step=version, reason="t", meta={}, sessions={}, chunk_size=CHUNK)
        assert live.read_manifest(version)["root"] == full.read_manifest(version)["root"]
        touched, base = Touched(), version
    assert unpack(live.load(len(deltas)).tree)["cp"]["00000000"] == {"msg": "back, last"}
