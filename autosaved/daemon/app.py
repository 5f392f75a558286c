"""The daemon's lifecycle: startup → serve → flush → exit.

Structure (after uvicorn and apscheduler 4): ``Daemon.run`` acquires the locks, binds the socket, starts
the rpc loop, the scheduler and the signal watcher in one anyio task group, tells systemd READY=1, and
waits for a stop request. Signal handlers only set that request; the flush then happens in the main
flow: new updates are refused (``shutting_down``), every dirty job is committed, and only then does the
task group close.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import zmq
import zmq.asyncio

from .. import __version__
from ..config import Config
from ..deadline import Pending, estimate_s, plan_flush
from ..errors import AutosavedError, InternalError, MessageTooLarge, ProtocolError, StorageError
from ..policy import SaveReason, decide
from ..protocol import check_request, error_reply, ok_reply, pack_header, unpack_header
from ..storage.local import Store
from .iocontrol import IoControl
from .jobs import Job, JobKey
from .lock import PidLock
from .notify import Notifier
from .preempt import MetadataWatcher
from .rpc import Handlers, Request
from .writer import Writer

log = logging.getLogger("autosaved.daemon")


def peer_uid(frame: zmq.Frame, default: int) -> int:
    """The uid of the process on the other end of an ipc connection.

    libzmq reports ``Peer-Address`` on ipc as ``<addr>:<uid>:<gid>:<pid>`` from SO_PEERCRED; on tcp there
    is no uid and the peer is treated as the daemon's own user (tcp is for trusted setups only).
    """
    try:
        addr = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError, KeyError):
        return default
    parts = str(addr).split(":")
    if len(parts) >= 4 and parts[-3].isdigit():
        return int(parts[-3])
    return default


class Daemon:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.boot = secrets.token_hex(8)
        self.pid = os.getpid()
        self.uid = os.geteuid()
        self.started_at = time.time()
        self.store = Store(config.state_dir)
        self.jobs: dict[JobKey, Job] = {}
        self.shutting_down = False
        self.exit_code = 0
        self.handlers = Handlers(self)
        self.writer = Writer(chunk_size=config.chunk_size, clock=clock, on_done=self._save_done,
                             max_write_rate=config.throttle.max_write_rate)
        self.io = IoControl(config, self.writer, clock)
        self.preempted: str | None = None
        self._wake = anyio.Event()
        self._save_waiters: list[anyio.Event] = []
        self._stop = anyio.Event()
        self._load_locks: dict[JobKey, anyio.Lock] = {}
        self._send_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self._locks: list[PidLock] = []
        self._sock: zmq.asyncio.Socket | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self.requests = 0
        self.errors = 0

    # -- wiring ----------------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake the scheduler: something changed that may make a save due sooner."""
        self._wake.set()

    def _save_done(self) -> None:
        for waiter in self._save_waiters:
            waiter.set()
        self._save_waiters.clear()
        self._wake.set()

    async def _wait_save_done(self, timeout: float) -> None:
        """Until some save finishes, or ``timeout`` seconds (each caller has its own event, so concurrent
        flushes never steal each other's wake-ups)."""
        event = anyio.Event()
        self._save_waiters.append(event)
        with anyio.move_on_after(timeout):
            await event.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def get_job(self, owner: int, name: str) -> Job:
        key = (owner, name)
        job = self.jobs.get(key)
        if job is not None:
            return job
        lock = self._load_locks.setdefault(key, anyio.Lock())
        async with lock:
            job = self.jobs.get(key)
            if job is not None:
                return job
            store = self.store.job(owner, name)

            def load() -> tuple[Any, list[int]]:
                store.clean_tmp()
                return store.load_newest(load_data=False), store.version_ids()

            try:
                loaded, ids = await anyio.to_thread.run_sync(load)
            except OSError as exc:
                raise StorageError(f"cannot open job {name!r}: {exc}") from exc
            job = Job(owner=owner, name=name, store=store, settings=self.config.policy)
            if loaded is not None:
                job.root = loaded.tree
                job.sessions = dict(loaded.sessions)
                job.durable = dict(loaded.sessions)
                job.latest_version = loaded.info.id
                job.step = loaded.info.step
                job.meta = dict(loaded.info.meta)
                job.last_save_time = loaded.info.time
                log.info("loaded job=%s owner=%d version=%d", name, owner, loaded.info.id)
            job.next_version = ids[-1] + 1 if ids else 1
            self.jobs[key] = job
            self._load_locks.pop(key, None)
            return job

    # -- lifecycle -------------------------------------------------------------------------------

    def _prepare_paths(self) -> None:
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        lock = PidLock(state_dir / "daemon.lock", f"state dir {state_dir}")
        lock.acquire()
        self._locks.append(lock)
        sock_path = self.config.socket_path()
        if sock_path is not None:
            if not sock_path.parent.exists():
                sock_path.parent.mkdir(parents=True, mode=0o700)
            sock_lock = PidLock(sock_path.with_name(sock_path.name + ".lock"), f"socket {sock_path}")
            sock_lock.acquire()
            self._locks.append(sock_lock)

    def _bind(self) -> zmq.asyncio.Socket:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        # A frame over the limit makes libzmq drop that peer's connection: the cheapest defence against a
        # client that would make the daemon allocate without bound. The total over all frames is
        # checked per message, with an error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            sock.bind(self.config.address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise AutosavedError(f"cannot listen on {self.config.address}: {exc}") from None
        path = self.config.socket_path()
        if path is not None:
            os.chmod(path, 0o660)
        return sock

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        self._prepare_paths()
        try:
            # Before serving, so every job starts with the derived dirty_bytes and no client ever sees the
            # probe's temp file.
            self.config = await self.io.measure_speed()
            self._sock = self._bind()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._rpc_loop)
                tg.start_soon(self._scheduler_loop)
                tg.start_soon(self._signal_loop)
                tg.start_soon(self.io.run)
                if self.config.preemption.provider != "off":
                    tg.start_soon(self._preemption_loop)
                log.info("serving address=%s state_dir=%s pid=%d version=%s", self.config.address,
                         self.config.state_dir, self.pid, __version__)
                self.notifier.ready(f"serving {self.config.address}")
                task_status.started()
                await self._stop.wait()
                await self._flush_all()
                tg.cancel_scope.cancel()
        finally:
            if self._sock is not None:
                self._sock.close(0)
            if self._ctx is not None:
                self._ctx.term()
            for lock in self._locks:
                lock.release()
            self.notifier.close()
        return self.exit_code

    async def _signal_loop(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                if not self._stop.is_set():
                    log.info("received %s: saving every dirty job, then exiting", signal.Signals(signum).name)
                    self.request_stop()
                else:
                    log.info("received %s again: still saving", signal.Signals(signum).name)


    async def _preemption_loop(self) -> None:
        """Poll the instance metadata; on a spot/preemption notice, flush every dirty job now, before the
        SIGTERM, and keep serving with the throttle off (the instance is going away: speed beats
        politeness, and whatever the trainer sends until the SIGTERM is then saved fast)."""
        settings = self.config.preemption
        watcher = MetadataWatcher(settings.provider, settings.endpoint)
        log.info("watching %s instance metadata at %s for preemption notices", settings.provider, watcher.base)
        last_error = None
        while True:
            try:
                notice = await anyio.to_thread.run_sync(watcher.check, abandon_on_cancel=True)
            except (OSError, ValueError) as exc:
                notice = None
                if str(exc) != last_error:  # once per distinct problem, not once per poll
                    log.warning("preemption watcher: %s", exc)
                    last_error = str(exc)
            if notice is not None:
                log.warning("preemption notice (%s): saving every dirty job now", notice.detail)
                self.preempted = notice.detail
                self.writer.bucket.bypass = True
                await self._flush_all(reason=SaveReason.PREEMPTION)
                return
            await anyio.sleep(settings.poll_interval)

    async def _flush_all(self, reason: SaveReason = SaveReason.SHUTDOWN) -> None:
        """Commit every accepted delta within ``shutdown_deadline``; report each job that misses it.

        The throttle's adaptive rate is off (``throttle.max_write_rate``, a hard cap, still holds). Jobs
        are saved one at a time in the order of :func:`autosaved.deadline.plan_flush`: the set that fits
        the deadline at the measured write speed, picked largest first (most bytes saved), run smallest
        first (most versions committed early if the disk turns out slower), then the rest, smallest first.
        Every commit is logged with the time left and extends systemd's stop timeout. On SIGTERM
        (``reason`` shutdown) updates are refused from the start and, at the deadline, saves still
        writing are abandoned (their temp files removed) so the daemon exits on time, with code 1. On a
        preemption notice the daemon keeps serving; the flush covers what was accepted before it.
        """
        final = reason is SaveReason.SHUTDOWN
        if final:
            self.shutting_down = True
        self.writer.bucket.bypass = True
        deadline = self.config.shutdown_deadline
        started = self.clock()
        targets = {k: j.generation for k, j in self.jobs.items() if j.dirty or j.saving}

        def pending() -> list[Job]:
            return [self.jobs[k] for k in plan.order if self.jobs[k].saved_generation < targets[k]]

        # Job.dirty_bytes drops to zero while a save holds the snapshot: keep what was planned, to report it.
        planned = {k: self.jobs[k].dirty_bytes for k in targets}
        plan = plan_flush([Pending(k, n) for k, n in planned.items()], self.writer.flush_speed(), deadline)
        total = len(plan.order)
        log.info("%s flush: %d dirty jobs, %.1f MiB, deadline %.1fs at %.0f MiB/s", reason, total,
                 sum(planned.values()) / 2**20, deadline, self.writer.flush_speed() / 2**20)
        for key in plan.order:
            if key not in plan.fits:
                log.warning("%s flush: job=%s dirty_bytes=%d needs about %.1fs, more than the deadline leaves; "
                            "saving it after the jobs that fit", reason, key[1], planned[key],
                            plan.estimate_s[key])
        status = f"{reason}: saving {total} dirty jobs within {deadline:g}s"
        if final:
            self.notifier.stopping(status)
        else:
            self.notifier.status(status)
        self.notifier.extend_timeout(deadline + 5)
        with anyio.move_on_after(deadline):
            committed = 0
            while todo := pending():
                now = self.clock()
                ready = [j for j in todo if j.retry_at is None or j.retry_at <= now]
                if any(j.saving for j in todo):
                    await self._wait_save_done(1.0)
                elif ready:
                    assert self._tg is not None
                    self.writer.begin(ready[0], reason, self._tg)
                    await self._wait_save_done(math.inf)
                else:  # every remaining job failed and waits for its retry
                    await self._wait_save_done(max(0.0, min(j.retry_at or now for j in todo) - now))
                if total - len(pending()) > committed:
                    committed = total - len(pending())
                    self._flush_progress(reason, committed, total, started)
        if final:
            self.writer.bucket.aborted = True  # a save still writing gives up at its next piece
        missed = pending()
        for job in missed:
            log.error("%s flush: job=%s NOT saved before the %.1fs deadline (dirty_bytes=%d, estimated %.1fs, "
                      "saving=%s, last_error=%s)", reason, job.name, deadline, planned[job.key],
                      plan.estimate_s.get(job.key, 0.0), job.saving, job.last_error)
        if missed:
            if final:
                self.exit_code = 1
            self.notifier.status(f"{reason}: {len(missed)} of {total} dirty jobs NOT saved before the deadline")
        else:
            log.info("%s flush: all %d jobs saved in %.2fs", reason, total, self.clock() - started)

    def _flush_progress(self, reason: SaveReason, done: int, total: int, started: float) -> None:
        left = self.config.shutdown_deadline - (self.clock() - started)
        log.info("%s flush: %d/%d jobs committed, %.1fs left", reason, done, total, left)
        self.notifier.status(f"{reason}: {done}/{total} jobs saved")
        self.notifier.extend_timeout(max(0.0, left) + 5)

    # -- scheduler -------------------------------------------------------------------------------

    async def _scheduler_loop(self) -> None:
        assert self._tg is not None
        while True:
            self._wake = anyio.Event()
            now = self.clock()
            wake_at = math.inf
            if not self.shutting_down:
                for job in list(self.jobs.values()):
                    decision = decide(job.view(), now)
                    if decision.reason is not None:
                        self.writer.begin(job, decision.reason, self._tg)
                    elif decision.next_wake_at is not None:
                        wake_at = min(wake_at, decision.next_wake_at)
            with anyio.move_on_after(max(0.0, wake_at - now)):
                await self._wake.wait()

    # -- rpc -------------------------------------------------------------------------------------

    async def _rpc_loop(self) -> None:
        assert self._sock is not None and self._tg is not None
        sock = self._sock
        while True:
            # poll-then-recv: cancelling a pending recv could lose a message, cancelling a poll cannot.
            if not await sock.poll(1000):
                continue
            frames = await sock.recv_multipart(copy=False)
            self._tg.start_soon(self._handle, frames)

    async def _handle(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # nothing to answer: a ROUTER frame with no content
        identity = frames[0].bytes
        self.requests += 1
        seq: int | None = None
        try:
            total = sum(len(f) for f in frames[1:])
            if total > self.config.max_message_bytes:
                raise MessageTooLarge(
                    f"message of {total} bytes is over the daemon's max_message_bytes ({self.config.max_message_bytes})"
                )
            header_frame = frames[1]
            header = unpack_header(header_frame.buffer)
            raw_seq = header.get("seq")
            seq = raw_seq if isinstance(raw_seq, int) and not isinstance(raw_seq, bool) else None
            op, seq = check_request(header)
            request = Request(
                op=op, seq=seq, header=header, frames=[f.buffer for f in frames[2:]],
                owner=peer_uid(header_frame, self.uid), header_size=len(header_frame),
            )
            reply = await self.handlers.dispatch(request)
            out = ok_reply(seq, self.boot, **reply.fields)
            await self._send(identity, out, reply.frames)
        except AutosavedError as exc:
            self.errors += 1
            if not isinstance(exc, ProtocolError):
                log.info("request failed seq=%s code=%s error=%s", seq, exc.code, exc.message)
            else:
                log.warning("bad request seq=%s: %s", seq, exc.message)
            await self._send(identity, error_reply(seq, self.boot, exc), ())
        except Exception as exc:
            self.errors += 1
            log.exception("internal error handling a request")
            await self._send(identity, error_reply(seq, self.boot, InternalError(f"internal error: {exc!r}")), ())

    async def _send(self, identity: bytes, header: dict[str, Any], frames: Any) -> None:
        assert self._sock is not None
        async with self._send_lock:
            try:
                await self._sock.send_multipart([identity, pack_header(header), *frames], copy=False)
            except zmq.ZMQError as exc:
                log.warning("could not send a reply: %s", exc)

    # -- reports ---------------------------------------------------------------------------------

    def status(self, owner: int | None) -> dict[str, Any]:
        speed = self.writer.flush_speed()
        jobs = [{**j.status(), "flush_estimate_s": round(estimate_s(j.dirty_bytes, speed), 3) if j.dirty else 0.0}
                for j in self.jobs.values() if owner is None or j.owner == owner]
        return {
            "daemon": {
                "pid": self.pid,
                "boot": self.boot,
                "version": __version__,
                "address": self.config.address,
                "state_dir": str(self.config.state_dir),
                "uptime_s": round(time.time() - self.started_at, 3),
                "shutting_down": self.shutting_down,
                "requests": self.requests,
                "errors": self.errors,
                "saves": self.writer.saves,
                "save_failures": self.writer.failures,
                "bytes_written": self.writer.bytes_written,
                "held_bytes": sum(j.held_bytes() for j in self.jobs.values()),
                "preempted": self.preempted,
                "throttle": self.io.status(),
            },
            "jobs": jobs,
        }

    def list_jobs(self, owner: int | None) -> list[dict[str, Any]]:
        """Jobs on disk and in memory (runs in a worker thread: it lists directories)."""
        out: dict[tuple[int, str], dict[str, Any]] = {}
        for store in self.store.jobs(owner):
            ids = store.version_ids()
            out[(store.owner, store.job)] = {
                "job": store.job, "owner": store.owner, "versions": len(ids),
                "latest": ids[-1] if ids else None, "bytes": store.stored_bytes(), "dirty": False,
            }
        for job in list(self.jobs.values()):
            if owner is not None and job.owner != owner:
                continue
            entry = out.setdefault(
                job.key, {"job": job.name, "owner": job.owner, "versions": 0, "latest": None, "bytes": 0}
            )
            entry["dirty"] = job.dirty
        return sorted(out.values(), key=lambda e: (e["owner"], e["job"]))


def serve(config: Config) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; returns the exit code."""
    daemon = Daemon(config)
    return anyio.run(daemon.run, backend="asyncio")

