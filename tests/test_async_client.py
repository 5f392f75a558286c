from __future__ import annotations

import anyio
import numpy as np
import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon

from .conftest import NO_AUTO_POLICY


def test_async_client_shares_the_protocol(daemon: PrivateDaemon) -> None:
    async def main() -> None:
        async with autosaved.AsyncClient("async-job", address=daemon.address) as c:
            ack = await c.update({"x": np.arange(5), "progress": {"stage": "a"}}, step=1)
            assert ack.level == "accepted"
            ack = await c.update({"progress": {"stage": "b"}}, step=2, wait="committed")
            assert ack.level == "committed" and ack.version == 1

            async def many(i: int) -> None:
                await c.update({"parallel": {str(i): i}})

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(many, i)
            state = await c.restore()
            assert state["progress"] == {"stage": "b"} and len(state["parallel"]) == 20
            assert (await c.status())["step"] == 2
            assert await c.save() == 2

    anyio.run(main)


def test_async_client_state_lost_and_unavailable(make_daemon: object, tmp_path: object) -> None:
    d: PrivateDaemon = make_daemon(NO_AUTO_POLICY)  # type: ignore[operator]

    async def main() -> None:
        c = autosaved.AsyncClient("a2", address=d.address, timeout=60)
        await c.connect()
        await c.update({"a": 1})
        d.kill()
        d.start()
        with pytest.raises(autosaved.StateLost):
            await c.update({"b": 1})
        c.close()
        with pytest.raises(autosaved.DaemonUnavailable):
            await autosaved.AsyncClient("a3", address=f"ipc://{tmp_path}/none.sock").connect()

    anyio.run(main)
