"""``dirty_bytes = "auto"`` is stable (issue 22): the write speed it is derived from is the median of
several probe samples, remembered per disk across restarts, refined by real saves; a reload logs the
value in force, not a placeholder."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import autosaved
from autosaved.daemon.speedmemo import MEMO_NAME, SpeedMemo, combine, worth_storing
from autosaved.testing.private import PrivateDaemon

from .conftest import wait_for

AUTO = 'write_speed = "auto"\nshutdown_deadline = "10s"\n[policy]\nidle = "off"\ninterval = "off"\nmin_gap = "0s"\n'


def test_combine_keeps_the_median() -> None:
    assert combine([146e6, 1143e6, 300e6, 310e6, 290e6]) == 300e6
    assert combine([5.0]) == 5.0
    with pytest.raises(ValueError):
        combine([])


@pytest.mark.parametrize(("stored", "current", "store"), [
    (None, 1.0, True), (100.0, 104.0, False), (100.0, 96.0, False), (100.0, 106.0, True), (100.0, 90.0, True),
])
def test_a_figure_is_rewritten_only_when_it_moved(stored: float | None, current: float, store: bool) -> None:
    assert worth_storing(stored, current) is store


def test_memo_round_trip_and_a_damaged_file(tmp_path: Path) -> None:
    memo = SpeedMemo(tmp_path)
    assert memo.load() is None
    memo.store(123e6, "probe")
    assert SpeedMemo(tmp_path).load() == 123e6
    doc = json.loads((tmp_path / MEMO_NAME).read_text())
    assert doc[memo.key]["source"] == "probe" and re.fullmatch(r"\d+:\d+", memo.key)
    (tmp_path / MEMO_NAME).write_text("{not json")
    assert SpeedMemo(tmp_path).load() is None


def _dirty_bytes(d: PrivateDaemon) -> int:
    with autosaved.Client("speed", address=d.address) as c:
        return int(c.status()["policy"]["dirty_bytes"])


def test_the_derived_limit_is_the_same_after_a_restart(make_daemon: Callable[..., PrivateDaemon],
                                                       tmp_path: Path) -> None:
    d = make_daemon(AUTO, root=tmp_path / "d")
    assert re.search(r"write speed probe: \d+/\d+/\d+/\d+ MiB/s, median \d+ MiB/s, remembered for disk", d.log())
    first = _dirty_bytes(d)
    assert (d.state_dir / MEMO_NAME).exists()
    assert d.stop() == 0
    d.start()
    assert "MiB/s remembered for disk" in d.log()
    assert _dirty_bytes(d) == first
    # A reload logs the limit in force (the derived figure), not the file's placeholder.
    d.config_path.write_text(AUTO.replace('idle = "off"', 'idle = "1h"'))
    d.send_signal(signal.SIGHUP)
    line = wait_for(lambda: re.search(r"config reloaded trigger=SIGHUP .*", d.log()))
    assert f"'dirty_bytes': {first}," in line.group(0), line.group(0)  # type: ignore[union-attr]


def test_real_saves_refine_the_remembered_figure(make_daemon: Callable[..., PrivateDaemon], tmp_path: Path) -> None:
    d = make_daemon(AUTO, root=tmp_path / "d", start=False)
    d.state_dir.mkdir(parents=True)
    memo = SpeedMemo(d.state_dir)
    memo.store(1e6, "probe")  # 1 MB/s: far below any real disk, so the first real save moves it
    d.start()
    assert "write speed 1 MiB/s remembered" in d.log()
    with autosaved.Client("speed", address=d.address) as c:
        c.update({"w": np.random.default_rng(0).random(2 << 20)}, wait="committed")  # 16 MiB, incompressible
    wait_for(lambda: json.loads((d.state_dir / MEMO_NAME).read_text())[memo.key]["source"] == "saves")
    assert SpeedMemo(d.state_dir).load() > 1e6  # type: ignore[operator]
    assert d.stop() == 0
    d.start()
    assert _dirty_bytes(d) >= 64 << 20
