"""The daemon's lifecycle: startup → serve → flush → exit.

Structure (after uvicorn and apscheduler 4): ``Daemon.run`` acquires the locks, binds the socket, starts
the rpc loop, the scheduler and the signal watcher in one anyio task group, tells systemd READY=1, and
waits for a stop request. Signal handlers only set that request; the flush then happens in the main
flow: new updates are refused (``shutting_down``), every dirty job is committed, and only then does the
task group close.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import math
import os
import secrets
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import msgpack
import psutil
import zmq
import zmq.asyncio

from .. import __version__
from ..config import Config
from ..deadline import Pending, estimate_s, plan_flush
from ..errors import (
    AutosavedError,
    Forbidden,
    InternalError,
    MessageTooLarge,
    ProtocolError,
    QuotaExceeded,
    StorageError,
)
from ..policy import SaveReason, decide
from ..protocol import check_request, error_reply, ok_reply, pack_header, unpack_header
from ..shm import fd_socket_path
from ..storage import faults
from ..storage.faults import point
from ..storage.local import Recovered, Store
from ..storage.wal import WalWriter
from ..tree import iter_blobs
from .accept import serve_capped
from .iocontrol import IoControl
from .jobs import Job, JobKey
from .lock import PidLock
from .metrics import Histogram, JobSample, Sample, open_metrics, serve_metrics
from .notify import Notifier, watchdog_loop
from .preempt import MetadataWatcher
from .reload import Reloader
from .replicator import Replicator
from .rpc import Handlers, Request
from .slottable import SlotTable, referenced_mappings
from .walcommit import LogCommitter
from .writer import Writer

log = logging.getLogger("autosaved.daemon")


def peer_uid(frame: Any) -> int | None:
    """The uid of the process on the other end of an ipc connection, or ``None`` when it cannot be told.

    libzmq reports ``Peer-Address`` on ipc as ``<addr>:<uid>:<gid>:<pid>`` from SO_PEERCRED. An unknown
    identity is never guessed (falling back on the daemon's own uid would give a root daemon's powers to
    anyone): the caller refuses the request. On tcp there is no uid at all; see :meth:`Daemon.owner_of`.
    """
    try:
        addr = frame.get("Peer-Address")
    except Exception:
        return None
    parts = str(addr).split(":")
    if len(parts) >= 4 and parts[-3].isdigit():
        return int(parts[-3])
    return None


def check_state_dir(path: Path, uid: int) -> None:
    """Refuse a state dir another user owns or others may write into: whoever can write there can plant
    links or forged manifests that the daemon (often root) would then follow or serve."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise AutosavedError(f"state_dir {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise AutosavedError(f"state_dir {path} is not a directory (a symlink is refused too)")
    if st.st_uid != uid:
        raise AutosavedError(f"state_dir {path} is owned by uid {st.st_uid}, not by the daemon's user (uid {uid}); "
                             "give it to the daemon's user (chown) or pick another state_dir")
    if st.st_mode & 0o022:
        raise AutosavedError(f"state_dir {path} is writable by its group or by everyone (mode "
                             f"{stat.S_IMODE(st.st_mode):o}); `chmod go-w {path}` (0700 is the default)")


# STATUS= is one datagram that `systemctl status` shows on one line: name the first few jobs that missed
# the deadline, each cut to a readable length, and count the rest.
STATUS_NAMES = 5
STATUS_NAME_CHARS = 40


def missed_names(names: list[str]) -> str:
    """``a, b, c`` for the jobs that missed the deadline; long names cut with ``…``, past five ``(+N more)``."""
    shown = [n if len(n) <= STATUS_NAME_CHARS else n[:STATUS_NAME_CHARS - 1] + "…" for n in names[:STATUS_NAMES]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" (+{more} more)" if more else "")


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
        self.log = LogCommitter(self._spawn, self.poke)
        self._wake = anyio.Event()
        # When the sleeping scheduler wakes up by itself (see poke_for); inf: not asleep on a timer.
        self._wake_at = math.inf
        self._save_waiters: list[anyio.Event] = []
        self._stop = anyio.Event()
        # One lock per (owner, job), never dropped: loading, deleting and recreating a job are serialised
        # by it, so no request is ever acknowledged for a job whose folder is being deleted.
        self._load_locks: dict[JobKey, anyio.Lock] = {}
        # One io lock per (owner, job), whether the job is loaded or not: saves, gc and verify of a job
        # exclude each other through it (a Job takes it over when loaded).
        self._io_locks: dict[JobKey, anyio.Lock] = {}
        self.in_flight_by_uid: dict[int, int] = {}
        self.task_failures = 0
        self._send_lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None
        self._locks: list[PidLock] = []
        self._sock: zmq.asyncio.Socket | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self.requests = 0
        self.errors = 0
        self.reloader = Reloader(self)
        self.save_durations = Histogram()
        self.writer.observe_duration = self.save_durations.observe
        # When the rpc loop last went round: the watchdog pings only while this keeps moving.
        self.progress_at = clock()
        # Trees a restore is reading from: their slots must stay lent until the bytes are copied out.
        self.restoring: dict[int, Any] = {}
        shm_cap = config.max_shm_bytes if config.max_shm_bytes is not None else psutil.virtual_memory().total // 2
        self.slots = SlotTable(shm_cap)
        self.replicator: Replicator | None = None
        if config.remote.url is not None:
            from ..storage.remote import holder_id

            def retention(key: JobKey) -> tuple[int, float | None]:
                job = self.jobs.get(key)
                settings = job.settings if job is not None else self.config.policy
                return settings.keep_last, settings.keep_every

            self.replicator = Replicator(config.remote, holder=holder_id(config.state_dir),
                                         local_store=self.store.job, retention=retention, spawn=self._spawn)
            replicator = self.replicator
            self.writer.on_commit = lambda job, version, written: replicator.committed(job.owner, job.name, version,
                                                                                      written)
            self.writer.protect = lambda job: replicator.protect(job.key)

    # -- wiring ----------------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake the scheduler: something changed that may make a save due sooner."""
        self._wake.set()

    def poke_for(self, job: Job) -> None:
        """After an update of ``job``: wake the scheduler only if the job may now be due before the
        scheduler's next wake-up (perf, issue 14). Waking it on every update made each small update
        cost a ``decide`` per job of the host; this is one ``decide``, for the job that changed."""
        decision = decide(job.view(), self.clock())
        if decision.reason is not None or (decision.next_wake_at is not None
                                           and decision.next_wake_at < self._wake_at):
            self._wake.set()

    def _spawn(self, func: Any, *args: Any) -> None:
        assert self._tg is not None
        self._tg.start_soon(func, *args)

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

    def key_lock(self, key: JobKey) -> anyio.Lock:
        return self._load_locks.setdefault(key, anyio.Lock())

    def io_lock(self, key: JobKey) -> anyio.Lock:
        return self._io_locks.setdefault(key, anyio.Lock())

    async def find_job(self, owner: int, name: str) -> Job | None:
        """The job, loaded (log replayed) if it exists on disk, or ``None`` if there is no such job: every
        read path goes through here, so it sees exactly what a restart's replay would rebuild."""
        job = self.jobs.get((owner, name))
        if job is not None:
            return job
        store = self.store.job(owner, name)
        if not await anyio.to_thread.run_sync(store.path.exists):
            return None
        return await self.get_job(owner, name)

    async def get_job(self, owner: int, name: str) -> Job:
        key = (owner, name)
        job = self.jobs.get(key)
        if job is not None and not job.deleted:
            return job
        async with self.key_lock(key):  # held by a delete of this job until its folder is gone
            job = self.jobs.get(key)
            if job is not None:
                return job
            store = self.store.job(owner, name)
            if self.replicator is not None and not await anyio.to_thread.run_sync(store.version_ids):
                # A fresh host (or a job this host never had): start from the bucket's newest version.
                await self.replicator.seed(owner, name, store)

            def load() -> tuple[Recovered | None, list[int]]:
                store.clean_tmp()
                return store.recover(load_data=False, repair=True), store.version_ids()

            try:
                recovered, ids = await anyio.to_thread.run_sync(load)
            except OSError as exc:
                raise StorageError(f"cannot open job {name!r}: {exc}") from exc
            job = Job(owner=owner, name=name, store=store, settings=self.config.policy, wal=WalWriter(store.log_dir),
                      io_lock=self.io_lock(key))
            if recovered is not None:
                job.root = recovered.tree
                job.sessions = dict(recovered.sessions)
                job.durable = dict(recovered.sessions)
                job.step = recovered.step
                job.meta = dict(recovered.meta)
                job.last_lsn = recovered.replay.max_lsn
                if recovered.version is not None:
                    job.latest_version = recovered.version.info.id
                    job.last_save_time = recovered.version.info.time
                    job.last_lsn = max(job.last_lsn, recovered.version.wal_lsn)
                if recovered.replay.records:
                    # Logged deltas newer than the newest version: save them as a version soon.
                    now = self.clock()
                    job.generation = 1
                    job.dirty_since = job.last_update_at = now
                    self.poke()  # the scheduler plans this job's save now, not at some unrelated wake-up
                log.info("loaded job=%s owner=%d version=%s replayed_log_records=%d", name, owner,
                         job.latest_version, len(recovered.replay.records))
            job.next_version = ids[-1] + 1 if ids else 1
            self.jobs[key] = job
            if self.replicator is not None:
                self.replicator.attach(owner, name, ids)
            return job

    # -- lifecycle -------------------------------------------------------------------------------

    def _socket_gid(self) -> int | None:
        group = self.config.socket_group
        if group is None or isinstance(group, int):
            return group
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise AutosavedError(f"socket_group: there is no group named {group!r}") from None

    def _prepare_paths(self) -> None:
        # Job state is private to the daemon: clients reach it only through the daemon, which checks who
        # they are. The socket's group is the clients' group, so files must not be group-readable either.
        os.umask(0o077)
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_state_dir(state_dir, self.uid)
        lock = PidLock(state_dir / "daemon.lock", f"state dir {state_dir}")
        lock.acquire()
        self._locks.append(lock)
        sock_path = self.config.socket_path()
        if sock_path is not None:
            if not sock_path.parent.exists():
                sock_path.parent.mkdir(parents=True, mode=0o700)
            gid = self._socket_gid()
            if gid is not None:
                # Only the daemon's user and this group may enter the socket's directory.
                self._give_to_group(sock_path.parent, gid)
                os.chmod(sock_path.parent, 0o750)
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
            gid = self._socket_gid()
            if gid is not None:
                self._give_to_group(path, gid)
        return sock

    def _give_to_group(self, path: Path, gid: int) -> None:
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            raise AutosavedError(
                f"socket_group: cannot give {path} to group {self.config.socket_group!r}: {exc.strerror}; the "
                "daemon's user must be a member of that group (under systemd, set Group= instead)"
            ) from None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        self._prepare_paths()
        try:
            # Before serving, so every job starts with the derived dirty_bytes and no client ever sees the
            # probe's temp file.
            self.config = await self.io.measure_speed()
            self._sock = self._bind()
            remote_up = True
            if self.replicator is not None:
                # A store that ignores If-None-Match is refused here, before serving (the error says why).
                remote_up = await self.replicator.probe(min(5.0, self.config.remote.timeout))
            metrics = await open_metrics(*self.config.metrics_address) if self.config.metrics_address else None
            async with anyio.create_task_group() as tg:
                self._tg = tg
                fd_path = fd_socket_path(self.config.address)
                if fd_path is not None:
                    # Before the rpc loop: a client that got an answer may use the fd socket right away.
                    await tg.start(self._fd_loop, fd_path)
                self._supervise(tg, "rpc", self._rpc_loop)
                self._supervise(tg, "scheduler", self._scheduler_loop)
                self._supervise(tg, "signals", self._signal_loop)
                self._supervise(tg, "reloader", self.reloader.watch)
                self._supervise(tg, "watchdog", self._watchdog)
                if metrics is not None:
                    self._supervise(tg, "metrics", serve_metrics, metrics, self.metrics_sample,
                                    self.config.max_connections)
                self._supervise(tg, "iocontrol", self.io.run)
                if self.replicator is not None and not remote_up:
                    tg.start_soon(self.replicator.probe_later)
                if self.config.preemption.provider != "off":
                    self._supervise(tg, "preemption", self._preemption_loop)
                log.info("serving address=%s state_dir=%s pid=%d version=%s", self.config.address,
                         self.config.state_dir, self.pid, __version__)
                self.notifier.ready(f"serving {self.config.address}")
                task_status.started()
                await self._stop.wait()
                flush_started = self.clock()
                point("task", "main", "before")  # the supervision tests make an error escape from here
                await self._flush_all()
                await self._drain_remote(flush_started)
                tg.cancel_scope.cancel()
        except Exception:
            # Nothing should get here (every task is supervised); if something does, what was accepted is
            # saved before the daemon exits, never dropped with it.
            log.exception("unexpected error; saving every dirty job, then exiting")
            self.exit_code = 1
            await self._last_chance_flush()
        finally:
            if self._sock is not None:
                self._sock.close(0)
            if self._ctx is not None:
                self._ctx.term()
            # We still hold the socket lock, so these are ours: a client then fails at once with "no daemon
            # at ..." instead of waiting out its timeout on a dead socket.
            sock_path = self.config.socket_path()
            if sock_path is not None and self._locks:
                for stale in (str(sock_path), fd_socket_path(self.config.address)):
                    if stale is not None:
                        with contextlib.suppress(OSError):
                            os.unlink(stale)
            for lock in self._locks:
                lock.release()
            self.notifier.close()
        return self.exit_code

    def _supervise(self, tg: anyio.abc.TaskGroup, name: str, func: Callable[..., Any], *args: Any) -> None:
        """Run a long-lived task that restarts (after a growing pause) whenever it fails: one task's bug
        costs a log line and a retry, never the daemon and every job it holds."""

        async def run() -> None:
            backoff = 0.1
            while True:
                try:
                    point("task", name, "start")
                    await func(*args)
                    return  # done (a watchdog with nothing to ping, a preemption notice handled)
                except Exception:
                    log.exception("task %s failed; restarting it in %.1fs", name, backoff)
                    self.task_failures += 1
                await anyio.sleep(backoff)
                backoff = min(30.0, backoff * 2)
                log.info("task %s restarting", name)

        tg.start_soon(run, name=f"autosaved-{name}")

    async def _reload_now(self) -> None:
        try:
            await self.reloader.reload("SIGHUP")
        except Exception:  # a bug in one reload: the running config stays, the daemon serves on
            log.exception("config reload on SIGHUP failed")

    async def _last_chance_flush(self) -> None:
        try:
            with anyio.move_on_after(self.config.shutdown_deadline + 5):
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    await self._flush_all()
                    tg.cancel_scope.cancel()
        except Exception:
            log.exception("the last-chance flush failed too")

    async def _signal_loop(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    assert self._tg is not None
                    self._tg.start_soon(self._reload_now)
                elif not self._stop.is_set():
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
            self.notifier.status(f"{reason}: {len(missed)} of {total} dirty jobs NOT saved before the deadline: "
                                 f"{missed_names([j.name for j in missed])}")
        else:
            log.info("%s flush: all %d jobs saved in %.2fs", reason, total, self.clock() - started)

    async def _drain_remote(self, started: float) -> None:
        """With ``[remote]``, the shutdown flush goes on uploading what it committed until the deadline;
        what is still not in the bucket then is named in the log and systemd's STATUS."""
        if self.replicator is None:
            return
        left = self.config.shutdown_deadline - (self.clock() - started)
        if self.replicator.backlog():
            log.info("shutdown flush: uploading committed versions, %.1fs left", left)
            self.notifier.status("shutdown: uploading committed versions to the object store")
            await self.replicator.drain(left)
        missed = self.replicator.backlog()
        for (_owner, name), versions in missed:
            log.error("shutdown flush: job=%s versions=%s committed locally but NOT uploaded before the deadline",
                      name, versions)
        if missed:
            self.notifier.status(f"shutdown: {len(missed)} jobs have versions NOT uploaded to the object store")
        elif self.replicator.replicas:
            log.info("shutdown flush: every committed version is in the object store")

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
            point("task", "scheduler", "before")
            now = self.clock()
            wake_at = math.inf
            if not self.shutting_down:
                for job in list(self.jobs.values()):
                    if job.deleted:
                        continue
                    decision = decide(job.view(), now)
                    if decision.reason is not None:
                        self.writer.begin(job, decision.reason, self._tg)
                    elif decision.next_wake_at is not None:
                        wake_at = min(wake_at, decision.next_wake_at)
            self._wake_at = wake_at
            with anyio.move_on_after(max(0.0, wake_at - now)):
                await self._wake.wait()

    # -- rpc -------------------------------------------------------------------------------------

    async def _rpc_loop(self) -> None:
        assert self._sock is not None and self._tg is not None
        sock = self._sock
        while True:
            self.progress_at = self.clock()
            if faults.active():  # the tests' hung event loop (loop.tick) and stalled rpc loop (rpc.poll)
                faults.point("loop", "tick", "before")
                await anyio.to_thread.run_sync(faults.point, "rpc", "poll", "before")
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
            owner = self.owner_of(header_frame)
            point("task", "rpc", "before", op)
            in_flight = self.in_flight_by_uid.get(owner, 0)
            if in_flight >= self.config.quota.max_requests:
                raise QuotaExceeded(
                    f"quota.max_requests: uid {owner} already has {in_flight} requests in flight (the limit is "
                    f"{self.config.quota.max_requests}); wait for their replies",
                    details={"quota": "max_requests", "limit": self.config.quota.max_requests, "used": in_flight},
                )
            self.in_flight_by_uid[owner] = in_flight + 1
            try:
                request = Request(
                    op=op, seq=seq, header=header, frames=[f.buffer for f in frames[2:]],
                    owner=owner, header_size=len(header_frame),
                )
                reply = await self.handlers.dispatch(request)
            finally:
                left = self.in_flight_by_uid[owner] - 1
                if left:
                    self.in_flight_by_uid[owner] = left
                else:
                    del self.in_flight_by_uid[owner]
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

    def owner_of(self, header_frame: Any) -> int:
        """Whose request this is. tcp carries no identity: it is the documented trusted-only setup, where
        every peer acts as the daemon's own user. On ipc an identity the kernel did not tell is refused."""
        if self.config.address.startswith("tcp://"):
            return self.uid
        uid = peer_uid(header_frame)
        if uid is None:
            raise Forbidden("cannot tell which user sent this request (no peer credentials); refused")
        return uid

    async def _send(self, identity: bytes, header: dict[str, Any], frames: Any) -> None:
        assert self._sock is not None
        async with self._send_lock:
            try:
                await self._sock.send_multipart([identity, pack_header(header), *frames], copy=False)
            except zmq.ZMQError as exc:
                log.warning("could not send a reply: %s", exc)

    # -- shared-memory slots ----------------------------------------------------------------------

    async def _fd_loop(self, path: str, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept clients' memfds (see :mod:`autosaved.shm`); one connection per client, whose end
        reclaims its slots."""
        # A socket left by a crashed daemon: we hold the socket lock, so no live daemon uses it.
        try:
            if os.path.exists(path):
                os.unlink(path)
            listener = await anyio.create_unix_listener(path, mode=0o660, kind=socket.SOCK_SEQPACKET)
            gid = self._socket_gid()
            if gid is not None:  # the same group that may reach the ipc socket
                self._give_to_group(Path(path), gid)
        except (OSError, AutosavedError) as exc:
            # Clients then send everything inline: slower for big states, but nothing breaks.
            log.warning("cannot listen on %s (%s); shared-memory transfers are off", path, exc)
            task_status.started()
            return
        task_status.started()
        try:
            while True:
                try:
                    await serve_capped(listener, self._fd_conn, max_conns=self.config.max_connections,
                                       name=f"fd socket {path}")
                except Exception:  # the listener itself broke: log, pause, accept again
                    log.exception("fd socket %s: accept loop failed; restarting it", path)
                    self.task_failures += 1
                    await anyio.sleep(1.0)
        finally:
            await listener.aclose()
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def _fd_conn(self, stream: Any) -> None:
        raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
        pid, uid, _gid = struct.unpack("3i", raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        conn = self.slots.open(uid, pid)
        log.debug("slot connection opened pid=%d uid=%d", pid, uid)
        send_lock = anyio.Lock()

        async def send_fds(msg: bytes, fds: list[int]) -> None:
            async with send_lock:  # replies here and restore buffers from request handlers share the stream
                await stream.send_fds(msg, fds)

        async def send(msg: bytes) -> None:
            async with send_lock:
                await stream.send(msg)

        conn.send_fds = send_fds
        try:
            async with stream:
                await send(msgpack.packb({"token": conn.token, "boot": self.boot}))
                while True:
                    msg, fds = await stream.receive_fds(4096, 4)
                    if not msg:
                        for fd in fds:
                            os.close(fd)
                        break
                    reply = self._fd_request(conn, msg, fds)
                    if not reply["ok"]:
                        log.warning("refused a shared-memory slot request pid=%d: %s", pid, reply["message"])
                    await send(msgpack.packb(reply))
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        except Exception:  # a bug: this connection ends (its slots reclaimed), the daemon serves on
            log.exception("slot connection pid=%d failed; closing it", pid)
        finally:
            log.info("slot connection closed pid=%d: reclaiming %d slots", pid, len(conn.slots))
            self.slots.close(conn)

    def _fd_request(self, conn: Any, msg: bytes, fds: list[int]) -> dict[str, Any]:
        """One request on the fd socket; every field checked here, every fd closed or kept by a slot."""
        try:
            point("task", "fd", "before", conn.pid)
            try:
                req = msgpack.unpackb(msg, strict_map_key=False)
            except Exception:
                req = None
            op = req.get("op") if isinstance(req, dict) else None
            slot = req.get("slot") if isinstance(req, dict) else None
            if op == "add":
                uid_limit = self.config.quota.max_shm_bytes
                size = req.get("size") if isinstance(req, dict) else None
                if (uid_limit is not None and isinstance(size, int)
                        and self.slots.mapped_bytes_of(conn.uid) + size > uid_limit):
                    for fd in fds:
                        os.close(fd)
                    fds = []
                    return {"ok": False, "message": f"quota.max_shm_bytes: uid {conn.uid} would map more than "
                                                    f"{uid_limit} bytes of slots"}
                taken, fds = fds, []  # add closes them, whatever happens
                reply: dict[str, Any] = self.slots.add(conn, slot, size, taken)
                return reply
            if op == "drop":
                if not isinstance(slot, int) or isinstance(slot, bool):
                    return {"ok": False, "message": "drop needs a slot id (an integer)"}
                self.slots.drop(conn, slot)
                return {"ok": True}
            return {"ok": False, "message": "unknown slot request"}
        except Exception as exc:
            log.exception("slot request failed")
            return {"ok": False, "message": f"internal error: {exc!r}"}
        finally:
            for fd in fds:
                os.close(fd)

    def referenced_mappings(self) -> set[int]:
        """Slot mappings that some live state or snapshot being written still reads."""
        roots = [j.root for j in self.jobs.values()] + [t.root for t in self.writer.in_flight.values()]
        # Deltas not yet in the log and records waiting for their fsync read slot bytes too.
        roots += [j.unlogged for j in self.jobs.values()]
        roots += [w.record.delta for j in self.jobs.values() for w in (*j.log_pending, *j.log_writing)]
        roots += list(self.restoring.values())
        return referenced_mappings(b for root in roots for b in iter_blobs(root))

    # -- reports ---------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        # The rpc loop polls with a 1 s timeout, so it goes round at least once a second while healthy.
        period = (self.notifier.watchdog_interval or 0.0) * 2
        await watchdog_loop(self.notifier, progress_at=lambda: self.progress_at, clock=self.clock,
                            status=self.status_line, stale_after=max(period, 3.0))

    def status_line(self) -> str:
        """One line for systemd's STATUS=: jobs, unsaved bytes, the newest save."""
        jobs = list(self.jobs.values())
        dirty = [j for j in jobs if j.dirty]
        newest = max((j for j in jobs if j.last_save_time), key=lambda j: j.last_save_time or "", default=None)
        last = (f"last save {newest.name} v{newest.latest_version} at {newest.last_save_time}"
                if newest is not None else "no save yet")
        failing = sum(1 for j in jobs if j.last_error)
        return (f"{len(jobs)} jobs, {len(dirty)} dirty ({sum(j.dirty_bytes for j in dirty)} bytes unsaved), "
                f"{last}" + (f", {failing} failing" if failing else ""))

    def metrics_sample(self) -> Sample:
        return Sample(
            uptime_s=time.time() - self.started_at, requests=self.requests, request_errors=self.errors,
            saves=self.writer.saves, save_failures=self.writer.failures, bytes_written=self.writer.bytes_written,
            reloads=self.reloader.reloads, reload_failures=self.reloader.failures, durations=self.save_durations,
            jobs=tuple(
                JobSample(job=j.name, owner=j.owner, saves=j.saves, bytes_written=j.bytes_written,
                          dirty_bytes=j.dirty_bytes, held_bytes=j.held_bytes(), consecutive_failures=j.failures,
                          saving=j.saving, last_save_time=j.last_save_time)
                for j in self.jobs.values()
            ),
        )

    def status(self, owner: int | None) -> dict[str, Any]:
        speed = self.writer.flush_speed()
        jobs = [{**j.status(), "flush_estimate_s": round(estimate_s(j.dirty_bytes, speed), 3) if j.dirty else 0.0,
                 **({"remote": self.replicator.status(j.key)} if self.replicator is not None else {})}
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
                "wal_syncs": self.log.syncs,
                "wal_records": self.log.records,
                "held_bytes": sum(j.held_bytes() for j in self.jobs.values()),
                "rss_bytes": psutil.Process().memory_info().rss,
                "shm": self.slots.report(),
                "preempted": self.preempted,
                "throttle": self.io.status(),
                "remote": self.replicator.summary() if self.replicator is not None else None,
            },
            "jobs": jobs,
        }

    def list_jobs(self, owner: int | None) -> list[dict[str, Any]]:
        """Jobs on disk and in memory (runs in a worker thread: it lists directories)."""
        out: dict[tuple[int, str], dict[str, Any]] = {}
        for store in self.store.jobs(owner):
            try:
                ids = store.version_ids()
                entry = {
                    "job": store.job, "owner": store.owner, "versions": len(ids),
                    "latest": ids[-1] if ids else None, "bytes": store.stored_bytes(),
                    # A job not loaded may still hold logged updates past its newest version.
                    "dirty": (store.owner, store.job) not in self.jobs and store.unsaved_log_records() > 0,
                }
            except FileNotFoundError:
                continue  # deleted while we listed it (found by the daemon fuzz loop: an internal error before)
            out[(store.owner, store.job)] = entry
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

