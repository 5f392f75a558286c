"""Lazy snapshots: ``update()`` returns at once and the bulk copy overlaps the trainer's next step.

Parameters and optimizer state do not change between one ``optimizer.step()`` and the next, so the copy
of a checkpoint into the shared-memory slots can run while the next forward and backward run (the "lazy"
snapshot of DataStates-LLM, here out of process). :class:`LazyClient` wraps a :class:`Client`:

- ``update(delta)`` validates ``delta`` and captures its structure and every scalar leaf at once (so
  the caller may rebind keys, step a scheduler, etc.), then returns a :class:`PendingUpdate`. A
  background thread copies the array and tensor bytes into the slots (numpy releases the GIL for the
  copy) and only then sends the update; ``accepted`` still means the bytes are in the daemon's hands.
- Where the bulk copy runs is decided per update (:mod:`autosaved.client.lazyplan`; issue 21): where the
  process has a core to spare beside the caller's compute threads (PyTorch's intra-op threads), a thread
  of its own copies at the lowest CPU priority (nice 19) while the trainer runs on. Where it has none, the
  copy waits for the fence and runs there on the caller's thread and helpers on every core, as an eager
  update's copy does (:mod:`autosaved.client.slotcopy`): a copy overlapped with a trainer that fills
  every core can only take a core from one of PyTorch's OpenMP threads (the others wait for it at the
  op's barrier) and compete with the step for memory bandwidth. A copy nobody fences runs in the
  background after a while (:func:`~autosaved.client.lazyplan.fence_wait`), so every update is sent. A
  fence that finds an overlapped copy unfinished takes the rest on itself the same way.
- ``fence()`` returns once that copy is done (waiting if it is not): from then on the caller may mutate
  its arrays, and nothing it does can reach the update. :meth:`LazyClient.hook_optimizer` installs a step
  pre-hook that fences before every ``optimizer.step()``, so a parameter update can never slip in before
  the copy. (Buffers that ``forward()`` changes in place, like BatchNorm's running statistics, are mutated
  before the step: such a model must fence before its forward.)
- Updates stay in order: a new ``update()`` (and ``save()``/``restore()``/``close()``) first waits for
  the previous one to be acknowledged. An error of a background update (the daemon gone, a restart that
  lost state: :class:`~autosaved.StateLost`) is raised by the next ``fence()``, ``update()`` or
  :meth:`PendingUpdate.result`; it is never dropped.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

import numpy as np

from ..codec import TensorMode, pack
from ..errors import InvalidValue
from ..protocol import ACK_LEVELS
from ..tree import Blob
from .base import Ack
from .lazyplan import CopyAt, copy_at, fence_wait
from .slotcopy import SharedCopy, assist, cores, quietly
from .slots import Placement
from .sync import Client

# The background copy's nice value: it runs only when a core has nothing better to do.
BACKGROUND_NICE = 19


class PendingUpdate:
    """One lazy update: ``copied`` once its bytes left the caller's arrays, ``result()`` once acked."""

    def __init__(self, copy_at: CopyAt = "overlap") -> None:
        self.copy_at: CopyAt = copy_at  # where the bulk copy runs (lazyplan.copy_at)
        self.copied = threading.Event()
        self.copy_error: BaseException | None = None
        self.future: Future[Ack] = Future()
        self.copy: SharedCopy | None = None  # the bulk copy, once the background thread has a slot
        self.ready = threading.Event()  # ``copy`` is set, or there is none (the update got past its copy)
        self.fencing = threading.Event()  # a caller fences: a copy left for the fence is its to do
        self.created = time.monotonic()
        self.fenced_after: float | None = None  # seconds from update() to the first fence

    def fence(self, timeout: float | None = None) -> None:
        """Wait until the update no longer reads the caller's arrays (copying what is left of it in this
        thread and the helpers); raise if the copy failed."""
        if self.fenced_after is None:
            self.fenced_after = time.monotonic() - self.created
        self.fencing.set()
        if not self.ready.wait(timeout):  # the background thread is still picking the slot
            raise TimeoutError("the lazy update's copy did not start in time")
        shared = self.copy
        if shared is not None and not self.copied.is_set():
            assist(shared)  # the trainer's cores are idle while it waits: the helpers copy beside it
            with contextlib.suppress(BaseException):  # its error is the background thread's to report
                shared.work()
        if not self.copied.wait(timeout):
            raise TimeoutError("the lazy update's copy did not finish in time")
        if self.copy_error is not None:
            raise self.copy_error

    def result(self, timeout: float | None = None) -> Ack:
        """The update's ack (raises its error); fences first (a copy left for the fence is done here)."""
        self.fence(timeout)
        return self.future.result(timeout)


class LazyClient:
    """Lazy-snapshot updates over ``client`` (which it then owns: use only the LazyClient)."""

    def __init__(self, client: Client, *, overlap: bool | None = None) -> None:
        """``overlap``: ``True`` always copies in the background, ``False`` always at the fence; ``None``
        (the default) decides per update by the cores left over (:func:`~autosaved.client.lazyplan.copy_at`)."""
        self.client = client
        self.overlap = overlap
        self.background_copies = 0  # bulk copies handed to the background thread (overlapped or unfenced)
        self._gap: float | None = None  # seconds from the caller's last update to its fence
        # One thread: updates are copied and sent in the order they were made.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autosaved-lazy")
        # The bulk copy's own thread, at the lowest priority: it fills the cores' idle moments.
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="autosaved-lazy-copy",
                                          initializer=_lower_priority)
        self._last: PendingUpdate | None = None

    def __enter__(self) -> LazyClient:
        self.client.connect()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def update(self, delta: Mapping[Any, Any], *, step: int | None = None,
               meta: Mapping[str, Any] | None = None, wait: str = "accepted") -> PendingUpdate:
        """Start an update and return at once. The caller must not mutate the arrays and tensors in
        ``delta`` until :meth:`fence` (or the optimizer hook) returned; everything else it may."""
        previous = self._last
        self.wait()  # the previous update is acked (or its error raised) before this one starts
        if previous is not None and previous.fenced_after is not None:
            self._gap = previous.fenced_after
        if not isinstance(delta, Mapping):
            raise InvalidValue(f"update() takes a mapping, not {type(delta).__name__}")
        if wait not in ACK_LEVELS:
            raise ValueError(f"wait must be one of {', '.join(ACK_LEVELS)}, not {wait!r}")
        # Structure and scalars are captured now; blobs still point at the caller's memory. A dict copy
        # of meta: the caller may change it after we return.
        packed = pack(delta, allow_delete=True, pinned=self.client._core.pinned)
        pending = PendingUpdate(self.copy_at())
        self._last = pending
        meta_copy = dict(meta) if meta is not None else None
        self._worker.submit(self._run, pending, packed, step, meta_copy, wait, fence_wait(self._gap))
        return pending

    def copy_at(self) -> CopyAt:
        """Where the next update's bulk copy runs: in the background, or at the fence."""
        if self.overlap is not None:
            return "overlap" if self.overlap else "fence"
        return copy_at(cores(), _compute_threads())

    def fence(self, timeout: float | None = None) -> None:
        """Return once the last update no longer reads the caller's arrays (waiting for its copy)."""
        if self._last is not None:
            self._last.fence(timeout)

    def wait(self, timeout: float | None = None) -> Ack | None:
        """Wait for the last update's ack; ``None`` if there was none. Raises its error once."""
        last, self._last = self._last, None
        if last is None:
            return None
        try:
            return last.result(timeout)
        except TimeoutError:
            self._last = last  # still running: keep it
            raise

    def hook_optimizer(self, optimizer: Any) -> Any:
        """Fence before every ``optimizer.step()`` (a PyTorch step pre-hook); returns the hook's handle
        (``handle.remove()`` uninstalls it)."""

        def pre_step(_opt: Any, _args: Any, _kwargs: Any) -> None:
            self.fence()

        return optimizer.register_step_pre_hook(pre_step)

    def save(self) -> int:
        self.wait()
        return self.client.save()

    def restore(self, version: int | None = None, *, tensors: TensorMode = "numpy", step: int | None = None) -> Any:
        self.wait()
        return self.client.restore(version, tensors=tensors, step=step)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._worker.shutdown(wait=True)
            self._copier.shutdown(wait=True)
            self.client.close()

    # -- the background side ----------------------------------------------------------------------

    def _run(self, pending: PendingUpdate, packed: Any, step: int | None, meta: dict[str, Any] | None,
             wait: str, fence_wait_s: float) -> None:
        try:
            ack = self._send(pending, packed, step, meta, wait, fence_wait_s)
        except BaseException as exc:
            if not pending.copied.is_set():
                pending.copy_error = exc
                pending.copied.set()
            pending.ready.set()
            pending.future.set_exception(exc)
        else:
            pending.copied.set()  # an update with nothing to copy never reached the placer
            pending.ready.set()
            pending.future.set_result(ack)

    def _send(self, pending: PendingUpdate, packed: Any, step: int | None, meta: dict[str, Any] | None,
              wait: str, fence_wait_s: float) -> Ack:
        client, slots = self.client, self.client._slots
        placed: list[tuple[Sequence[Blob], Placement | None]] = []

        def share(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
            shared = SharedCopy(pairs)
            pending.copy = shared  # from now on a fence helps copy
            pending.ready.set()
            # Left for the fence: the caller's threads copy it when they would wait anyway. Only if no
            # fence comes in time does the background thread copy it (the update must still be sent).
            if pending.copy_at == "overlap" or not pending.fencing.wait(fence_wait_s):
                self.background_copies += 1
                self._copier.submit(quietly, shared.work)
            shared.wait()

        def placer(blobs: Sequence[Blob]) -> Placement | None:
            try:
                placement = slots.place(blobs, copy=share)
                in_slot = {i for i, _ in placement.refs} if placement is not None else set()
                for i, blob in enumerate(blobs):
                    # Leaves that travel inline would be copied only by the send: copy them now, so that
                    # nothing reads the caller's memory after the fence.
                    if i not in in_slot and blob.data is not None and not isinstance(blob.data.obj, bytes):
                        blob.data = memoryview(bytes(blob.data))
                placed.append((blobs, placement))
            finally:
                pending.copied.set()
                pending.ready.set()
            return placement

        def from_our_slot() -> None:
            # A new daemon does not know our slots (or lost our state): the resend is built again. The
            # caller may have mutated its arrays since the fence, so the resend must take the bytes from
            # our slot, not from the caller.
            if not placed:
                return
            blobs, placement = placed[-1]
            if placement is not None and placement.slot in slots.slots:
                array = slots.slots[placement.slot].array
                for i, off in placement.refs:
                    blobs[i].data = memoryview(array[off : off + blobs[i].nbytes].tobytes())

        flow = client._core.update(packed, step=step, meta=meta, wait=wait, placer=placer,
                                   before_resend=from_our_slot)
        return client._conn.run(flow)


def _compute_threads() -> int:
    """The caller's compute threads: PyTorch's intra-op threads where it is loaded, else the caller alone."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 1
    try:
        return int(torch.get_num_threads())
    except Exception:  # a torch that is half imported or stubbed: count the caller alone
        return 1


def _lower_priority() -> None:
    """The copy thread yields the CPU to the trainer's threads (Linux: a thread's nice value is its own)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


