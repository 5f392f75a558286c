"""The client core's flows, in process: each test plays the daemon by hand, answering the steps a flow
yields with reply frames built by the same wire functions the daemon uses. No sockets, no daemon: these
pin down the decisions the sync and async drivers share (stale replies, the ``slot_unknown`` retry, the
``StateLost`` retry, a restore through shared memory, the admin calls)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import autosaved
from autosaved.client.core import AdminCore, ClientCore, Flow, Local, LostState, Receive, Send, Step, drive
from autosaved.client.slots import SlotPool
from autosaved.codec import pack
from autosaved.errors import AutosavedError, NotFound, ProtocolError, StateLost
from autosaved.protocol import INLINE_LEAF_MAX, blob_descriptors, error_reply, ok_reply, pack_header, unpack_header
from autosaved.tree import DELETE, to_node

BOOT = "boot-1"


def reply(seq: int, *frames: bytes, **fields: Any) -> list[memoryview]:
    return [memoryview(pack_header(ok_reply(seq, BOOT, **fields))), *map(memoryview, frames)]


def refusal(seq: int, err: AutosavedError, boot: str = BOOT) -> list[memoryview]:
    return [memoryview(pack_header(error_reply(seq, boot, err)))]


class Daemon:
    """Steps a flow: runs its ``Local`` work (or answers it from ``local``), and records what it sent."""

    def __init__(self, flow: Flow[Any], local: dict[str, Any] | None = None) -> None:
        self.flow = flow
        self.local = local or {}
        self.sent: list[dict[str, Any]] = []
        self.locals: list[str] = []
        self.step: Step = next(flow)
        self.result: Any = None

    def _advance(self, value: Any) -> None:
        try:
            self.step = self.flow.send(value)
        except StopIteration as done:
            self.result = done.value
            self.step = None  # type: ignore[assignment]

    def until_receive(self) -> dict[str, Any]:
        """Perform Local and Send steps up to the next Receive; the header of the request last sent."""
        while not isinstance(self.step, Receive):
            if isinstance(self.step, Send):
                self.sent.append(unpack_header(self.step.frames[0]))
                self._advance(None)
            elif isinstance(self.step, Local):
                self.locals.append(self.step.what)
                self._advance(self.local[self.step.what] if self.step.what in self.local else self.step.run())
            else:
                raise AssertionError(f"unexpected step {self.step!r}")
        return self.sent[-1]

    def answer(self, frames: list[memoryview]) -> None:
        assert isinstance(self.step, Receive), self.step
        self._advance(frames)


def test_update_drops_a_stale_reply_and_tracks_acks() -> None:
    core = ClientCore("job", policy={"idle": "5s"})
    d = Daemon(core.update({"a": np.arange(3)}, step=4, meta={"why": "test"}))
    sent = d.until_receive()
    assert sent["op"] == "update" and sent["step"] == 4 and sent["policy"] == {"idle": "5s"}
    assert sent["boot"] is None and sent["acked"] == 0
    d.answer(reply(sent["seq"] - 1, ack="accepted"))  # a late answer to an earlier, timed-out request
    assert isinstance(d.step, Receive)
    d.answer(reply(sent["seq"], ack="logged", durable=0))
    assert d.result == autosaved.Ack(level="logged", seq=sent["seq"])
    assert core.acked == core.durable == sent["seq"] and core.boot == BOOT
    # the next update names what this daemon acknowledged
    d = Daemon(core.update({"b": 1}))
    nxt = d.until_receive()
    assert nxt["boot"] == BOOT and nxt["acked"] == sent["seq"] and nxt["seq"] == sent["seq"] + 1


def test_slot_unknown_starts_a_fresh_pool_and_sends_once_more() -> None:
    slots = SlotPool("tcp://127.0.0.1:1")  # tcp: the pool places nothing and never opens a socket
    core = ClientCore("job", slots=slots)
    d = Daemon(core.update({"a": np.arange(3)}))  # an array: built as blocking work, where a slot could take it
    first = d.until_receive()
    d.answer(refusal(first["seq"], ProtocolError("unknown slot 3", details={"code": "slot_unknown"})))
    second = d.until_receive()
    assert d.locals == ["build_update", "reset_slots", "build_update"]
    assert second["seq"] == first["seq"] + 1 and second["tree"] == first["tree"]
    d.answer(reply(second["seq"], ack="accepted", held=[]))
    assert d.result.seq == second["seq"]
    # retried once only: a second refusal of the resent update is the caller's error
    d = Daemon(core.update({"a": 2}))
    d.answer(refusal(d.until_receive()["seq"], ProtocolError("unknown slot", details={"code": "slot_unknown"})))
    again = d.until_receive()
    with pytest.raises(AutosavedError, match="unknown slot"):
        d.answer(refusal(again["seq"], ProtocolError("unknown slot", details={"code": "slot_unknown"})))


def test_a_daemon_of_an_older_protocol_gets_an_error_that_says_what_to_do() -> None:
    """A daemon that speaks only protocol 1 refuses this SDK's version 2 with ``bad_version`` and its own
    words; the SDK adds which version it speaks and what to upgrade."""
    core = ClientCore("job")
    d = Daemon(core.update({"a": 1}))
    sent = d.until_receive()
    old = ProtocolError("protocol version 2 is not supported (this daemon speaks 1)", details={"code": "bad_version"})
    with pytest.raises(ProtocolError, match=r"speaks 1\) \(this SDK speaks protocol version 2: upgrade the daemon"):
        d.answer(refusal(sent["seq"], old))


def test_slot_unknown_without_a_pool_is_an_error() -> None:
    core = ClientCore("job")
    d = Daemon(core.update({"a": 1}))
    sent = d.until_receive()
    with pytest.raises(AutosavedError, match="unknown slot"):
        d.answer(refusal(sent["seq"], ProtocolError("unknown slot", details={"code": "slot_unknown"})))


def _lost(seq: int) -> list[memoryview]:
    return refusal(seq, StateLost("lost", details={"acked_seq": seq - 1, "durable_seq": 1}), boot="boot-2")


def test_state_lost_without_a_callback_raises_and_learns_the_new_daemon() -> None:
    core = ClientCore("job")
    core.acked, core.boot = 5, BOOT
    d = Daemon(core.update({"a": 1}))
    sent = d.until_receive()
    d.answer(_lost(sent["seq"]))
    assert isinstance(d.step, LostState) and d.step.error.details["durable_seq"] == 1
    with pytest.raises(StateLost):
        d._advance(False)
    assert core.boot == "boot-2" and core.acked == core.durable == 1


def test_state_lost_with_a_callback_resends_the_update() -> None:
    core = ClientCore("job")
    d = Daemon(core.update({"a": 1}))
    sent = d.until_receive()
    d.answer(_lost(sent["seq"]))
    assert isinstance(d.step, LostState)
    d._advance(True)  # the driver ran on_state_lost
    again = d.until_receive()
    assert again["op"] == "update" and again["boot"] == "boot-2" and again["acked"] == 1
    d.answer(reply(again["seq"], ack="accepted"))
    assert d.result.seq == again["seq"]


def test_a_new_daemons_save_or_status_reply_does_not_teach_its_boot_over_unsaved_acks() -> None:
    """A save or status that reaches a restarted daemon first must not hide a loss: the client keeps the old
    boot id (so the next update is checked) and the save does not mark the accepted deltas durable."""
    from autosaved.protocol import ok_reply

    core = ClientCore("job")
    core.boot, core.acked, core.durable = BOOT, 5, 3  # seqs 4 and 5 were only accepted
    for flow, fields in ((core.save(), {"version": 2}), (core.status(), {})):
        d = Daemon(flow)
        sent = d.until_receive()
        d.answer([memoryview(pack_header(ok_reply(sent["seq"], "boot-2", **fields)))])
        assert core.boot == BOOT and core.durable == 3
    d = Daemon(core.update({"a": 1}))
    assert d.until_receive()["boot"] == BOOT  # the daemon compares it with its own and checks seq 5
    # With nothing unsaved, a new daemon's boot is simply learned.
    core.durable = core.acked
    d = Daemon(core.status())
    d.answer([memoryview(pack_header(ok_reply(d.until_receive()["seq"], "boot-3")))])
    assert core.boot == "boot-3"


def _restore_reply(seq: int, state: dict[str, Any], *, shm: bool) -> tuple[list[memoryview], dict[int, memoryview]]:
    node, blobs = to_node(pack(state))
    fields: dict[str, Any] = {"tree": node, "blobs": blob_descriptors(blobs), "version": 3, "step": 9}
    placed = {i: b.data for i, b in enumerate(blobs) if b.data is not None and b.nbytes > 100}
    if shm:
        fields["shm"] = {"seq": seq, "size": 4096, "refs": [[i, 0] for i in placed]}
    inline = [bytes(b.data) for i, b in enumerate(blobs) if b.data is not None and not (shm and i in placed)]
    return reply(seq, *inline, **fields), placed if shm else {}


def test_restore_receives_bulk_leaves_through_shared_memory_only_when_announced() -> None:
    state = {"big": np.arange(1000, dtype=np.int64), "small": np.arange(3), "step": 9}
    # An ipc address, never connected (the test answers the Local step that would connect)
    core = ClientCore("job", slots=SlotPool("ipc:///nonexistent/d.sock"))
    d = Daemon(core.restore(), local={"restore_conn": "token-1"})
    sent = d.until_receive()
    assert sent["op"] == "restore" and sent["shm_conn"] == "token-1" and d.locals == ["restore_conn"]
    frames, placed = _restore_reply(sent["seq"], state, shm=True)
    assert placed  # the big leaf does not travel inline
    d.answer(frames)
    assert isinstance(d.step, Local) and d.step.what == "receive_restore"
    d._advance(placed)
    np.testing.assert_array_equal(d.result["big"], state["big"])
    assert d.result["step"] == 9
    # no shm field: everything inline, no memfd to receive
    d = Daemon(core.restore(2), local={"restore_conn": None})
    sent = d.until_receive()
    assert sent["version"] == 2 and sent["shm_conn"] is None
    frames, _ = _restore_reply(sent["seq"], state, shm=False)
    d.answer(frames)
    assert d.locals == ["restore_conn"]
    np.testing.assert_array_equal(d.result["small"], state["small"])
    # Connected already (or on tcp, or with the path off): a restore takes no blocking step at all, so the
    # async driver makes no hop to a worker thread (issue 21).
    core.slots.conn, core.slots.token = object(), "token-2"  # type: ignore[assignment,union-attr]
    d = Daemon(core.restore())
    assert d.until_receive()["shm_conn"] == "token-2" and d.locals == []
    d = Daemon(ClientCore("job", slots=SlotPool("tcp://127.0.0.1:1")).restore())
    assert d.until_receive()["shm_conn"] is None and d.locals == []


def test_save_hello_and_errors() -> None:
    core = ClientCore("job")
    d = Daemon(core.hello())
    sent = d.until_receive()
    assert sent["op"] == "hello" and sent["session"] == core.session
    d.answer(reply(sent["seq"], durable=7))
    assert core.durable == core.acked == 7
    d = Daemon(core.save())
    sent = d.until_receive()
    d.answer(reply(sent["seq"], version=12))
    assert d.result == 12
    d = Daemon(core.status())
    sent = d.until_receive()
    with pytest.raises(NotFound, match="no job"):
        d.answer(refusal(sent["seq"], NotFound("no job 'job'")))
    with pytest.raises(ValueError, match="wait must be"):  # checked before anything is sent
        Daemon(core.update({}, wait="soon")).until_receive()
    with pytest.raises(autosaved.InvalidJobName):
        ClientCore("../x")


def test_admin_calls_name_the_job_and_owner() -> None:
    core = AdminCore(owner=1234)
    d = Daemon(core.versions("job"))
    sent = d.until_receive()
    assert sent["op"] == "list" and sent["job"] == "job" and sent["owner"] == 1234
    d.answer(reply(sent["seq"], versions=[{"id": 1}]))
    assert d.result == [{"id": 1}]
    d = Daemon(core.jobs())
    sent = d.until_receive()
    assert sent["job"] is None
    d.answer(reply(sent["seq"], jobs=[{"job": "a"}]))
    assert d.result == [{"job": "a"}]
    d = Daemon(core.maintain("gc", None))
    sent = d.until_receive()
    assert sent["op"] == "gc" and d.sent and isinstance(d.step, Receive)
    d.answer(reply(sent["seq"], jobs=[{"job": "a", "removed": 0}]))
    assert d.result == [{"job": "a", "removed": 0}]
    d = Daemon(core.delete("a"))
    sent = d.until_receive()
    d.answer(reply(sent["seq"], job="a", owner=1234, deleted_versions=2))
    assert d.result == {"job": "a", "owner": 1234, "deleted_versions": 2}
    with pytest.raises(ValueError):
        next(core.maintain("compact", None))
    with pytest.raises(autosaved.InvalidJobName):
        next(core.delete("a/b"))


def test_admin_export_and_replace() -> None:
    admin = AdminCore()
    d = Daemon(admin.export("job", 3))
    sent = d.until_receive()
    assert sent["op"] == "restore" and sent["job"] == "job" and sent["version"] == 3
    frames, _ = _restore_reply(sent["seq"], {"w": np.ones(2), "step": 9}, shm=False)
    d.answer(frames)
    exported = d.result
    assert exported.version == 3 and exported.step == 9 and not exported.live
    assert exported.tree["w"].shape == (2,)  # a raw Blob leaf, not an array
    # replace: the keys the job has and the new state lacks are deleted, and the version is waited for
    job = ClientCore("job", owner=7)
    d = Daemon(admin.replace(job, {"w": np.zeros(2)}, step=1, meta=None))
    sent = d.until_receive()
    d.answer(_restore_reply(sent["seq"], {"w": np.ones(2), "old": 1}, shm=False)[0])
    update = d.until_receive()
    assert update["op"] == "update" and update["wait"] == "committed" and update["owner"] == 7
    assert dict(update["tree"]["m"])["old"] == {"x": 0} and "w" in dict(update["tree"]["m"])
    d.answer(reply(update["seq"], ack="committed", version=5))
    assert d.result.ack.version == 5 and d.result.removed == ["old"]
    assert DELETE is autosaved.DELETE


def test_drive_runs_a_flow_with_a_blocking_performer() -> None:
    core = ClientCore("job")
    seen: list[str] = []

    def perform(step: Step) -> Any:
        seen.append(type(step).__name__)
        if isinstance(step, Local):
            return step.run()
        if isinstance(step, Send):
            perform.seq = unpack_header(step.frames[0])["seq"]  # type: ignore[attr-defined]
            return None
        return reply(perform.seq, ack="accepted")  # type: ignore[attr-defined]

    ack = drive(core.update({"a": np.arange(2)}), perform)
    assert ack.level == "accepted" and seen == ["Local", "Send", "Receive"]


def test_a_small_update_is_one_frame_built_in_the_flow_and_a_big_one_is_blocking_work() -> None:
    """Issue 21: a delta of scalars and small bytes (a LangGraph checkpoint) is built by the flow itself
    (no hop to a worker thread in the async driver) and travels as one frame, its bytes inside the header
    (protocol 2); arrays, and bytes too big to go inline, are built as a Local step and travel as frames."""
    core = ClientCore("job")
    d = Daemon(core.update({"cp": {"c": ["msgpack", b"\x01" * 300]}, "n": 3, "blob": bytearray(b"ab")}))
    d.until_receive()
    assert d.locals == [] and isinstance(d.step, Receive)
    sent = d.sent[-1]
    assert sent["v"] == 2 and "blobs" not in sent and "step" not in sent and "meta" not in sent
    assert sent["tree"] == {"m": [["cp", {"m": [["c", {"l": ["msgpack", {"B": b"\x01" * 300}]}]]}], ["n", 3],
                                  ["blob", {"B": b"ab"}]]}
    big = b"x" * (INLINE_LEAF_MAX + 1)
    for delta in ({"a": np.arange(3)}, {"a": big}):
        d = Daemon(core.update(delta))
        sent = d.until_receive()
        assert d.locals == ["build_update"] and len(sent["blobs"]) == 1


def test_the_async_driver_runs_blocking_steps_off_the_event_loop_and_frees_its_lock_for_the_callback() -> None:
    import threading

    import anyio

    from autosaved.client.aio import AsyncConnection

    loop_thread: list[threading.Thread] = []
    ran_in: list[threading.Thread] = []

    def blocking() -> str:
        ran_in.append(threading.current_thread())
        return "done"

    def inner() -> Flow[str]:
        result: str = yield Local("receive_restore", blocking)
        return result

    def outer() -> Flow[str]:  # the shape of ClientCore.update's retry
        lost = StateLost("lost")
        if not (yield LostState(lost)):
            raise lost
        return (yield from inner())

    async def on_lost(err: StateLost) -> None:
        # what a real callback does: use the same client again while the first call waits
        assert await conn.run(inner()) == "done"

    conn = AsyncConnection("ipc:///nonexistent", timeout=1, save_timeout=1, on_state_lost=on_lost)

    async def main() -> str:
        loop_thread.append(threading.current_thread())
        with anyio.fail_after(10):  # a lock held across the callback would hang here
            return await conn.run(outer())

    assert anyio.run(main) == "done"
    assert len(ran_in) == 2 and all(t is not loop_thread[0] for t in ran_in)
    # without a callback the flow raises StateLost itself
    with pytest.raises(StateLost):
        anyio.run(AsyncConnection("ipc:///nonexistent", timeout=1, save_timeout=1).run, outer())


def test_which_requests_get_the_save_timeout_comes_from_the_op_table() -> None:
    """A request is long (the driver gives it save_timeout) exactly when protocol.OP_TABLE says so."""
    core, admin = ClientCore("job"), AdminCore("job")
    longs = {name: core.request(name, {}).long for name in ("ping", "hello", "status", "list", "save", "restore")}
    # hello is long since issue 19: it may load the job and replay its log first
    assert longs == {"ping": False, "hello": True, "status": False, "list": False, "save": True, "restore": True}
    assert [core.update_request({"n": 1}, step=None, meta=None, wait=w).long
            for w in ("accepted", "logged", "committed", "replicated")] == [False, False, True, True]
    assert all(admin.request(op, {}).long for op in ("verify", "gc", "delete"))
