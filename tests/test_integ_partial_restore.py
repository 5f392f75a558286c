"""Partial restore: ``restore(path=...)`` / ``restore(paths=[...])`` return subtrees, and only their leaves
travel (what lets one LangGraph thread cost that thread, not the whole job)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import autosaved
from autosaved.testing.private import PrivateDaemon


def _state() -> dict[str, object]:
    return {
        "threads": {
            "t1": {"a": np.arange(4, dtype=np.int32), "n": 1, 7: b"x" * 10},
            "t2": {"a": np.zeros(1_000_000, dtype=np.uint8), "n": 2},
        },
        "top": "level",
    }


def test_path_returns_only_that_subtree(daemon: PrivateDaemon) -> None:
    with autosaved.Client("p", address=daemon.address) as c:
        c.update(_state(), wait="logged")
        sub = c.restore(path=("threads", "t1"))
        assert set(sub) == {"a", "n", 7} and sub[7] == b"x" * 10
        np.testing.assert_array_equal(sub["a"], np.arange(4, dtype=np.int32))
        assert c.restore(path=["threads", "t1", 7]) == b"x" * 10  # an int key stays an int on the wire
        assert c.restore(path=("threads", "nope")) is None
        assert c.restore(path=("top", "deeper")) is None  # a scalar has no children
        many = c.restore(paths=[("threads", "t2", "n"), ("missing",), ("top",)])
        assert many == [2, None, "level"]
        assert c.restore(path=()) is not None  # the empty path is the root


def test_path_reads_only_the_subtree_from_a_stored_version(make_daemon: object) -> None:
    from tests.conftest import NO_AUTO_POLICY

    d: PrivateDaemon = make_daemon(NO_AUTO_POLICY)  # type: ignore[operator]
    with autosaved.Client("p", address=d.address) as c:
        c.update(_state())
        c.save()
    d.stop()
    d.start()
    with autosaved.Client("p", address=d.address) as c:
        # The job is not loaded: the stored version answers, and only t1's leaves are read.
        assert c.restore(path=("threads", "t1", "n")) == 1
        big = c.restore(path=("threads", "t2", "a"))
        assert big.shape == (1_000_000,)


def test_async_paths(daemon: PrivateDaemon) -> None:
    async def main() -> None:
        async with autosaved.AsyncClient("p", address=daemon.address) as c:
            assert await c.restore(paths=[("x",)]) == [None]  # no state yet: one None per path
            await c.update(_state())
            assert await c.restore(path=("threads", "t2", "n")) == 2

    asyncio.run(main())


@pytest.mark.parametrize("bad", [("a", 1.5), "threads", [None], [True]])
def test_bad_paths_are_refused_in_the_client(daemon: PrivateDaemon, bad: object) -> None:
    with autosaved.Client("p", address=daemon.address) as c, pytest.raises(ValueError, match="path"):
        c.restore(path=bad)  # type: ignore[arg-type]


def test_daemon_refuses_a_malformed_paths_field(daemon: PrivateDaemon) -> None:
    import zmq

    from autosaved.protocol import PROTOCOL_VERSION, pack_header, unpack_header

    with autosaved.Client("p", address=daemon.address) as c:
        c.update({"a": 1})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.address)
    try:
        for seq, bad in enumerate([[["a", {"x": 1}]], "a", [["a"]] * 5000], start=1):
            sock.send_multipart([pack_header({"v": PROTOCOL_VERSION, "op": "restore", "seq": seq, "job": "p",
                                              "paths": bad})])
            assert sock.poll(20_000), "no reply"
            reply = unpack_header(sock.recv_multipart()[0])
            assert reply["ok"] is False and "path" in reply["message"], reply
    finally:
        sock.close(0)
    with autosaved.Client("p", address=daemon.address) as c:
        assert c.restore() == {"a": 1}  # the daemon still serves and the state is intact
