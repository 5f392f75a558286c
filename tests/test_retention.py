"""Retention with ``keep_best`` (issue 22): the pure decision, table-driven, then a real daemon whose
``list`` marks the versions it keeps for their score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest

import autosaved
from autosaved.config import PolicySettings
from autosaved.errors import ConfigError
from autosaved.storage.retention import KeepBest, best_versions, score, versions_to_delete
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY, version_files, wait_for

MIN1 = KeepBest("val_loss", "min", 1)
MAX2 = KeepBest("acc", "max", 2)
SCORES = {1: 0.9, 2: 0.3, 3: 0.5, 4: None, 5: 0.3, 6: 0.7}


@pytest.mark.parametrize(("scores", "rule", "want"), [
    (SCORES, MIN1, [5]),                       # a tie: the newer version wins
    (SCORES, KeepBest("val_loss", "min", 2), [2, 5]),
    (SCORES, KeepBest("val_loss", "max", 1), [1]),
    ({1: 0.1, 2: 0.9, 3: 0.5}, MAX2, [2, 3]),
    ({1: None, 2: None}, MIN1, []),            # nothing scored: nothing kept for it
    ({}, MIN1, []),
    ({1: 5.0}, KeepBest("x", "min", 3), [1]),  # fewer scored versions than count
])
def test_best_versions(scores: dict[int, float | None], rule: KeepBest, want: list[int]) -> None:
    assert best_versions(scores, rule) == want


@pytest.mark.parametrize(("meta", "want"), [
    ({"val_loss": 0.25}, 0.25), ({"val_loss": 3}, 3.0), ({"val_loss": True}, None), ({"val_loss": "0.2"}, None),
    ({"val_loss": float("nan")}, None), ({"val_loss": float("inf")}, None), ({}, None), (None, None),
])
def test_score(meta: dict[str, object] | None, want: float | None) -> None:
    assert score(meta, "val_loss") == want


VERSIONS = [(i, 1000.0 + i) for i in range(1, 7)]


@pytest.mark.parametrize(("keep_last", "rule", "scores", "protect", "want"), [
    (2, None, {}, frozenset(), [1, 2, 3, 4]),
    (2, MIN1, SCORES, frozenset(), [1, 2, 3, 4]),            # the best (5) is among the newest two anyway
    (1, MIN1, SCORES, frozenset(), [1, 2, 3, 4]),            # 6 newest, 5 best
    (1, KeepBest("val_loss", "min", 2), SCORES, frozenset(), [1, 3, 4]),  # 6 newest, 2 and 5 best
    (1, MIN1, {1: 0.1, 6: 0.9}, frozenset({3}), [2, 4, 5]),  # protect still holds
    (1, MIN1, {99: 0.0}, frozenset(), [1, 2, 3, 4, 5]),      # a score of a version that is gone counts for nothing
])
def test_versions_to_delete_with_keep_best(keep_last: int, rule: KeepBest | None, scores: dict[int, float | None],
                                           protect: frozenset[int], want: list[int]) -> None:
    assert versions_to_delete(VERSIONS, keep_last=keep_last, keep_every=None, protect=protect, keep_best=rule,
                              scores=scores) == want


@pytest.mark.parametrize(("raw", "error"), [
    ({"mode": "min"}, "policy.keep_best.metric"),
    ({"metric": "l", "mode": "lowest"}, "policy.keep_best.mode"),
    ({"metric": "l", "count": 0}, "policy.keep_best.count"),
    ({"metric": "l", "best": 1}, "policy.keep_best.best: unknown key"),
    (5, "policy.keep_best: expected a table"),
])
def test_keep_best_config_errors_name_the_key(raw: object, error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace(".", r"\.")):
        PolicySettings.parse({"keep_best": raw})


def test_keep_best_config() -> None:
    p = PolicySettings.parse({"keep_best": {"metric": "val_loss", "mode": "min", "count": 1}})
    assert p.keep_best == MIN1 and p.to_wire()["keep_best"] == {"metric": "val_loss", "mode": "min", "count": 1}
    assert PolicySettings.parse({"keep_best": "off"}, base=p).keep_best is None


def test_a_daemon_keeps_the_best_and_list_marks_it(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY + 'keep_last = 2\nkeep_best = { metric = "val_loss", mode = "min", count = 1 }\n')
    with autosaved.Client("best", address=d.address) as c:
        for step, loss in enumerate([0.9, 0.3, 0.5, 0.7, 0.8], start=1):
            c.update({"w": step}, step=step, meta={"val_loss": loss}, wait="committed")
    # Retention runs right after each commit's ack: wait for the one after version 5.
    wait_for(lambda: [int(p.stem) for p in version_files(d.state_dir, "best")] == [2, 4, 5])
    env = {**os.environ, "AUTOSAVED_ADDRESS": d.address}
    out = subprocess.run([sys.executable, "-m", "autosaved", "list", "best", "--json"], capture_output=True,
                         text=True, env=env, timeout=60)
    rows = json.loads(out.stdout)
    assert [(r["id"], r.get("best")) for r in rows] == [(2, "val_loss"), (4, None), (5, None)]
    text = subprocess.run([sys.executable, "-m", "autosaved", "list", "best"], capture_output=True, text=True,
                          env=env, timeout=60).stdout
    assert "* val_loss=0.3" in text.splitlines()[1], text
    assert autosaved.restore("best", state_dir=d.state_dir, version=2) == {"w": 2}
