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


def test_async_clients_come_and_go_on_one_loop_across_loops_and_threads(daemon: PrivateDaemon) -> None:
    """The async client keeps its socket's FD registered with the event loop between requests (perf, issue
    21), so closing must take it off first: a closed FD left registered breaks the next add_reader of its
    number (a new client's socket often gets it). Closed on the loop, after a timeout, after its loop
    ended, from another thread while its loop runs, and never (the loop holds it weakly)."""
    import asyncio
    import gc
    import signal
    import threading

    from autosaved.client.aio import AsyncConnection

    def connections() -> int:
        gc.collect()  # what earlier tests in this process left in cycles goes first
        return sum(type(o) is AsyncConnection for o in gc.get_objects())

    async def one(job: str, value: int) -> autosaved.AsyncClient:
        c = autosaved.AsyncClient(job, address=daemon.address, timeout=30)
        await c.update({"v": value})
        assert await c.restore(path=["v"]) == value
        return c

    async def on_one_loop() -> autosaved.AsyncClient:
        for i in range(4):
            (await one(f"come-go-{i}", i)).close()
        before = connections()
        c = await one("dropped", 1)
        del c  # never closed: its connection is collected all the same
        assert connections() == before
        c = await one("stopped", 1)
        c.timeout = 0.5
        daemon.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(autosaved.DaemonUnavailable):
                await c.update({"v": 2})  # times out: the client drops its socket on the loop
        finally:
            daemon.send_signal(signal.SIGCONT)
        c.timeout = 30.0
        await c.update({"v": 3})  # a new socket, watched anew
        return c

    survivor = asyncio.run(on_one_loop())
    survivor_job_value = asyncio.run(survivor.restore(path=["v"]))  # the same client on a second loop
    assert survivor_job_value == 3
    survivor.close()  # its loop has ended

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        c = asyncio.run_coroutine_threadsafe(one("threaded", 5), loop).result(60)
        c.close()  # from this thread, while its loop runs
        asyncio.run_coroutine_threadsafe(one("threaded-2", 6), loop).result(60).close()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)
        loop.close()
