"""GC by marking kept between collections (storage/gcmark.py), on a real filesystem: retention after a save
reads the pages that save wrote and the ones the dropped version alone held, lists no directory, and keeps
exactly what the versions on disk reach, across formats 1 and 2, versions another process wrote, failed
saves and unreadable manifests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autosaved.codec import pack, unpack
from autosaved.state import merge
from autosaved.storage.local import JobStore

CHUNK = 64 * 1024


def store(root: Path, fmt: int = 2, job: str = "gc") -> JobStore:
    js = JobStore(root, os.geteuid(), job)
    js.write_format = fmt
    return js


def save(js: JobStore, tree: Any, version: int, keep: int = 2) -> int:
    """Write ``version`` and apply retention as the daemon's writer does; the objects the save wrote."""
    result = js.write_version(tree, version=version, step=version, reason="test", meta={}, sessions={},
                              chunk_size=CHUNK)
    js.apply_retention(keep, protect={version})
    return result.chunks_written


def files(js: JobStore) -> set[str]:
    return {p.name.removesuffix(".zst") for p in js.objects_dir.rglob("*") if p.is_file()}


def exact(js: JobStore) -> None:
    """Every object a version on disk reaches is stored, and nothing else (checked by a full mark)."""
    refs = js.referenced_digests()
    assert refs is not None
    assert files(js) == refs
    for vid in js.version_ids():
        assert js.verify(vid).ok, js.verify(vid).error


def agent(n: int) -> dict[str, Any]:
    return {"cp": {f"{i:08d}": {"msg": f"message {i} " * 40, "step": i} for i in range(n)}, "step": n}


def collection_after_a_save(tmp_path: Path, n: int) -> tuple[int, int, int, int]:
    """(pages read, objects listed, manifests read, objects written) by the retention of the last of a
    few small saves over a history of ``n`` checkpoints."""
    js = store(tmp_path / str(n))
    tree = pack(agent(n))
    save(js, tree, 1)
    for v in range(2, 6):
        tree = merge(tree, pack({"cp": {f"{n + v:08d}": {"msg": f"new {v}", "step": v}}, "step": v}))
        before = js.live.stats.pages_read, js.live.stats.objects_listed, js.live.stats.manifests_read
        written = save(js, tree, v)
    assert js.version_ids() == [4, 5]
    exact(js)
    stats = js.live.stats
    assert stats.full == 0  # a new job: its counts were exact from its first save, never a full mark
    return (stats.pages_read - before[0], stats.objects_listed - before[1], stats.manifests_read - before[2],
            written)


def test_a_collection_after_a_save_reads_what_changed_not_the_history(tmp_path: Path) -> None:
    small = collection_after_a_save(tmp_path, 300)
    big = collection_after_a_save(tmp_path, 8000)  # 27x the history, ~5 MB of pages
    for pages, listed, manifests, written in (small, big):
        assert listed == 0  # no directory listing
        assert manifests == 1  # the new version's root record; the dropped one's refs were kept
        # The new version's pages (what the save wrote) and the dropped version's own pages (as many).
        assert pages <= 2 * written, (pages, written)
    assert big[0] <= small[0] + 4  # one more level of interior pages at most


def test_a_store_object_over_stored_versions_marks_everything_once(tmp_path: Path) -> None:
    """A daemon start: the counts of a job with stored versions are unknown, so its first collection marks
    every version and sweeps every object (what a crash left goes too); the next ones are incremental."""
    js = store(tmp_path)
    tree = pack(agent(200))
    for v in range(1, 4):
        tree = merge(tree, pack({"step": v}))
        save(js, tree, v, keep=5)
    leftover = js.object_path("ab" * 32)
    leftover.parent.mkdir(exist_ok=True)
    leftover.write_bytes(b"a crashed save's chunk")
    again = store(tmp_path)
    for v in range(4, 7):
        tree = merge(tree, pack({"step": v}))
        save(again, tree, v, keep=2)
    assert (again.live.stats.full, again.live.stats.incremental) == (1, 2)
    assert not leftover.exists()
    exact(again)


def test_gc_by_marking_keeps_what_retained_roots_reach_across_formats(tmp_path: Path) -> None:
    """A job saved in format 1, then format 2 (the daemon's next save after an upgrade): a chunk both hold
    survives the format-1 version's deletion; chunks only it held go."""
    w = np.arange(200_000, dtype=np.float64)  # chunked in both formats: the same chunk digests
    old = np.full(200_000, 7.0)
    js1 = store(tmp_path, fmt=1)
    save(js1, pack({"w": w, "old": old, "a": 1}), 1, keep=5)
    js = store(tmp_path, fmt=2)
    tree = js.load(1, load_data=False).tree
    tree = merge(tree, pack({"old": None, "a": 2}))
    save(js, tree, 2, keep=5)
    old_chunks = {d for rec in js.leaf_records(1) if rec["shape"] == [200_000] for d, _ in rec["chunks"]}
    exact(js)
    js.apply_retention(1, protect={2})
    assert js.version_ids() == [2]
    exact(js)
    assert np.array_equal(unpack(js.load(2).tree)["w"], w)
    assert files(js) & old_chunks  # w's chunks stayed (format 2 references them too)
    assert not (files(js) & (old_chunks - {d for rec in js.leaf_records(2) for d, _ in rec["chunks"]}))


def test_a_version_another_store_object_wrote_is_marked_before_anything_is_dropped(tmp_path: Path) -> None:
    """The counts follow the manifests on disk, not the writes this object saw: a version written by
    another process (a command, a seed) shares a chunk with a version this object drops."""
    js = store(tmp_path)
    shared = np.arange(100_000, dtype=np.float64)
    save(js, pack({"x": shared}), 1, keep=5)
    save(js, pack({"y": 1}), 2, keep=5)  # the first collection happens at the first drop (none yet)
    js.apply_retention(5, protect={2})
    other = store(tmp_path)
    other.write_version(pack({"z": shared}), version=3, step=3, reason="test", meta={}, sessions={},
                        chunk_size=CHUNK)
    js.apply_retention(1, protect={3})  # drops 1 (the shared chunks' only holder it knows of) and 2
    assert js.version_ids() == [3]
    exact(js)
    assert np.array_equal(unpack(js.load(3).tree)["z"], shared)


def test_a_failed_save_leaves_objects_the_next_collection_sweeps(tmp_path: Path) -> None:
    js = store(tmp_path)
    save(js, pack({"a": np.zeros(50_000)}), 1)
    save(js, pack({"a": np.ones(50_000)}), 2)
    save(js, pack({"a": np.full(50_000, 3.0)}), 3)  # the first collection drops 1
    calls = 0

    def pace(_nbytes: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk gone")

    big = pack({"a": np.random.default_rng(0).standard_normal(200_000)})  # 25 chunks
    with pytest.raises(Exception, match="disk gone"):
        js.write_version(big, version=4, step=4, reason="test", meta={}, sessions={}, chunk_size=CHUNK,
                         pace=pace)
    assert js.live.stale
    save(js, pack({"a": np.full(50_000, 4.0)}), 4)
    exact(js)  # the failed save's chunks are gone too
    assert js.live.stats.full == 1  # the collection after the failed save, only


def test_an_unreadable_manifest_blocks_every_deletion(tmp_path: Path) -> None:
    js = store(tmp_path)
    for v in range(1, 4):
        save(js, pack({"v": np.full(50_000, float(v))}), v, keep=5)
    manifest = js.versions_dir / "000000000003.json"
    good = manifest.read_bytes()
    manifest.write_bytes(good.replace(b'"reason"', b'"reasom"'))
    before = files(js)
    fresh = store(tmp_path)  # a daemon start: its first collection marks every version
    assert fresh.apply_retention(1, protect={3}) == [1, 2]
    assert files(fresh) == before  # what 3 references is unknown: not one object goes
    assert fresh.live.stale
    manifest.write_bytes(good)
    assert fresh.collect_garbage().blocked is None
    exact(fresh)
    assert fresh.live.stats.full == 2


@pytest.mark.parametrize("seed", range(4))
def test_every_kept_version_stays_whole_through_the_daemons_mix_of_saves_and_collections(
        tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #20's powerloss finding (a kept version missing an object the run itself deleted) searched in
    process: saves, failed saves (chunks renamed in, no manifest), evictions (counts and caches dropped,
    warmed again from the newest version), `autosaved gc` from a second store object, and restarts (a new
    store object, a full rewrite), in a random order; every kept version verifies after every step and the
    objects on disk are exactly what they reach after each collection."""
    import random

    import autosaved.storage.chunkwriter as chunkwriter
    from autosaved.storage.warm import warm

    rng = random.Random(seed)
    arrays = [np.random.default_rng(i).integers(0, 255, 150_000, dtype=np.uint8) for i in range(4)]
    tree = pack({"n": 0, "big": arrays[0], "zeros": np.zeros(140_000, np.uint8), "small": {"k": 1}})
    js, version = store(tmp_path), 0
    real_fsync_dir = chunkwriter.fsync_dir

    def failing(*_args: Any) -> None:
        raise OSError(5, "injected")

    for step in range(30):
        op = rng.choice(["update", "blob", "save", "save", "fail", "evict", "gc", "restart"])
        if op == "update":
            tree = merge(tree, pack({"n": step, "small": {"k": rng.randint(0, 3)}}))
        elif op == "blob":
            tree = merge(tree, pack({rng.choice(["big", "late", "fresh"]): arrays[rng.randrange(4)]}))
        elif op in ("save", "fail"):
            version += 1
            if op == "fail":
                monkeypatch.setattr(chunkwriter, "fsync_dir", failing)
            try:
                js.write_version(tree, version=version, step=version, reason="test", meta={}, sessions={},
                                 chunk_size=CHUNK)
            except Exception:
                assert op == "fail"
            else:
                js.apply_retention(2, protect={version})
                if not js.live.stale:  # collected incrementally: exactly what the versions reach is left
                    exact(js)
            monkeypatch.setattr(chunkwriter, "fsync_dir", real_fsync_dir)
        elif op == "evict":  # daemon/statecache.drop_store_caches, then make_resident's warm
            js.paged_cache, js.page_refs = None, {}
            js.live.forget()
            if js.version_ids():
                newest = js.version_ids()[-1]
                tree = js.load(newest, load_data=False).tree
                warm(js, newest, tree)
        elif op == "gc":
            store(tmp_path).gc(2, None)
            exact(js)
        else:
            js = store(tmp_path)
        for vid in js.version_ids():
            assert js.verify(vid).ok, (step, op, js.verify(vid).error)


def test_marking_a_new_version_reads_none_of_the_pages_its_save_wrote(tmp_path: Path) -> None:
    """The save knows what each page it wrote references: the collection after it reads only the pages
    the dropped version alone held (each to find what it held), none of the new version's."""
    js = store(tmp_path)
    tree = pack(agent(3000))
    save(js, tree, 1)
    for v in range(2, 7):
        tree = merge(tree, pack({"cp": {f"{3000 + v:08d}": {"msg": f"new {v}", "step": v}}, "step": v}))
        read, deleted = js.live.stats.pages_read, js.live.stats.objects_deleted
        written = save(js, tree, v)
        assert written > 0
        if v > 3:  # (the first collection, at 3, marks versions 1 and 2 too, whose saves are long past)
            # no chunked leaves here: every object deleted is a page the dropped version alone held
            assert js.live.stats.pages_read - read == js.live.stats.objects_deleted - deleted > 0
    assert js.live.stats.full == 0 and js.version_ids() == [5, 6]
    exact(js)
