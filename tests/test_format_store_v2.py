"""``tests/data/store_v2`` (format 2: root records over pages, written by this release's daemon with
``tests/data/make_store_v2.py``) must restore exactly, offline and through the daemon, by path too, in
every later build."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from autosaved import restore
from autosaved.client.sync import Client
from autosaved.codec import unpack
from autosaved.storage import paged
from autosaved.storage.local import JobStore
from autosaved.testing.crashsim import deep_merge
from autosaved.testing.private import PrivateDaemon

from .test_format_store import as_torch, norm

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("make_store_v2", DATA / "make_store_v2.py")
assert _spec is not None and _spec.loader is not None
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def expected(job: str) -> dict[Any, Any]:
    state: dict[Any, Any] = {}
    for delta, wait in (gen.model_updates() if job == "model" else gen.agent_updates()):
        if wait != "save":
            state = deep_merge(state, delta)
    return state


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    dst = tmp_path / "root" / "state"
    shutil.copytree(DATA / "store_v2" / "jobs" / "0", dst / "jobs" / str(os.geteuid()))
    return dst


def test_store_v2_has_every_feature_it_promises() -> None:
    agent = DATA / "store_v2" / "jobs" / "0" / "agent"
    docs = [json.loads(p.read_bytes()) for p in sorted((agent / "versions").glob("*.json"))]
    assert all(d["format"] == paged.FORMAT and "tree" not in d for d in docs)
    assert docs[-1]["height"] >= 1 and docs[-1]["parent"] == docs[-2]["version"]
    js = JobStore(DATA / "store_v2", 0, "agent")
    pages: set[str] = set()
    counted = 0
    for d in docs:
        one: set[str] = set()
        paged.referenced(js, d, "fixture", one)
        pages |= one
        counted += len(one)
    assert len(docs) == 3 and counted > 1.5 * len(pages)  # the versions share most of their pages
    files = {p.name for p in (agent / "objects").rglob("*") if p.is_file()}
    assert pages <= files  # (the daemon was killed right after the last commit: a page gc had yet to remove)
    model = DATA / "store_v2" / "jobs" / "0" / "model" / "objects"
    assert any(p.suffix == ".zst" for p in model.rglob("*"))  # chunked leaves, compressed and raw
    assert any(p.is_file() and not p.suffix for p in model.rglob("*"))


def test_store_v2_restores_exactly_offline(state_dir: Path) -> None:
    pytest.importorskip("torch")  # the fixture's model job holds a bfloat16 tensor
    for job in ("model", "agent"):
        assert norm(restore(job, state_dir=state_dir, tensors="torch")) == norm(as_torch(expected(job)))
    got = restore("agent", state_dir=state_dir)
    assert list(got["order"]) == ["z", "a", 10, "10", "b"]  # a mapping's insertion order, kept
    assert got["after"] == "the last version"  # a log record past the last version


def test_store_v2_restores_by_path_offline(state_dir: Path) -> None:
    js = JobStore(state_dir, os.geteuid(), "agent")
    newest = js.version_ids()[-1]
    assert unpack(js.load_path(newest, ("cp", "000007"))) == expected("agent")["cp"]["000007"]
    assert unpack(js.load_path(newest, ("a\x00b",))) == (3, [4])


def test_store_v2_restores_exactly_through_the_daemon(state_dir: Path) -> None:
    pytest.importorskip("torch")
    with PrivateDaemon(state_dir.parent, config=gen.CONFIG) as d:
        for job in ("model", "agent"):
            c = Client(job, address=d.address, timeout=30, save_timeout=60)
            try:
                c.connect()
                assert norm(c.restore(tensors="torch")) == norm(as_torch(expected(job)))
                assert norm(c.restore(path=["cp", "000400"]) if job == "agent" else 0) == \
                    norm(expected("agent")["cp"]["000400"] if job == "agent" else 0)
            finally:
                c.close()
        assert d.stop(signal.SIGTERM) == 0
    for job in ("model", "agent"):
        assert norm(restore(job, state_dir=state_dir, tensors="torch")) == norm(as_torch(expected(job)))
