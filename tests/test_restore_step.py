"""``Client.restore(step=N)``, ``AsyncClient.restore(step=N)`` and ``autosaved.restore(job, step=N)``
(issue 22): the newest verified stored version at that step, through the daemon and from the state dir."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY


def test_restore_by_step_everywhere(make_daemon: Callable[..., PrivateDaemon]) -> None:
    d = make_daemon(NO_AUTO_POLICY + "keep_last = 10\n")
    with autosaved.Client("steps", address=d.address) as c:
        for step in (10, 20, 30):
            c.update({"w": step, "tag": f"s{step}"}, step=step, wait="committed")
        c.update({"tag": "s20 again"}, step=20, wait="committed")  # two versions at step 20: the newer wins
        c.update({"w": 99}, step=40)  # accepted only: not a stored version
        assert c.restore(step=10) == {"w": 10, "tag": "s10"}
        assert c.restore(step=20) == {"w": 30, "tag": "s20 again"}
        with pytest.raises(autosaved.NotFound, match="no verified version at step 40"):
            c.restore(step=40)
        with pytest.raises(ValueError, match="version or step"):
            c.restore(1, step=10)
        assert c.restore()["w"] == 99

    async def aio() -> object:
        async with autosaved.AsyncClient("steps", address=d.address) as ac:
            return await ac.restore(step=30)

    assert anyio.run(aio, backend="asyncio") == {"w": 30, "tag": "s30"}
    assert d.stop() == 0
    assert autosaved.restore("steps", state_dir=d.state_dir, step=20) == {"w": 30, "tag": "s20 again"}
    with pytest.raises(autosaved.NotFound):
        autosaved.restore("steps", state_dir=d.state_dir, step=5)
