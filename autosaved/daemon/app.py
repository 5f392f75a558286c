"""The daemon's lifecycle: startup → serve → flush → exit.

Structure (after uvicorn and apscheduler 4): ``Daemon.run`` acquires the locks, binds the socket, starts
the rpc loop, the scheduler and the signal watcher in one anyio task group, tells systemd READY=1, and
waits for a stop request. Signal handlers only set that request; the flush then happens in the main
flow: new updates are refused (``shutting_down``), every dirty job is committed, and only then does the
task group close.
"""

from __future__ import annotations

import contextlib
import functools
import grp
import logging
import math
import os
import secrets
import signal
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import psutil
import zmq

from .. import __version__
from ..config import Config, PolicySettings
from ..errors import (
    AutosavedError,
    ConfigError,
    Forbidden,
    InternalError,
    MessageTooLarge,
    ProtocolError,
    QuotaExceeded,
)
from ..policy import SaveReason, decide
from ..protocol import check_request, error_reply, ok_reply, pack_header, unpack_header
from ..shm import fd_socket_path
from ..storage import faults
from ..storage.faults import point
from ..storage.local import Store
from .connguard import ConnGuard
from .fdlimit import listener_cap, raise_nofile
from .fdserver import FdContext, FdServer
from .flush import FlushContext, drain_remote, flush_all
from .health import failing_until, health
from .iocontrol import IoControl
from .jobs import Job, JobKey
from .jobtable import JobTable
from .lock import PidLock
from .metrics import Histogram, log_sync_histogram, open_metrics, serve_metrics
from .notify import Notifier, watchdog_loop
from .preempt import MetadataWatcher
from .reload import ReloadContext, Reloader
from .replicator import Replicator
from .replybudget import SEND_HWM, TRACK_MIN, ReplyBudget, over_budget
from .reports import ReportContext, Reports
from .rpc import Deferred, Handlers, Reply, RpcContext, RpcRequest
from .rpcsocket import Receiver, SharedSocket
from .runstate import Phase, RunState
from .slottable import SlotTable
from .wakeups import Wakeups
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


class Daemon:
    def __init__(self, config: Config, *, clock: Callable[[], float] = time.monotonic,
                 notifier: Notifier | None = None) -> None:
        # The live config: ``apply_config`` is its only writer; every helper reads it through a getter.
        self.config = config
        self.clock = clock
        self.notifier = notifier or Notifier()
        self.boot = secrets.token_hex(8)
        self.pid = os.getpid()
        self.uid = os.geteuid()
        self.store = Store(config.state_dir, write_format=config.write_format())
        self.run_state = RunState()
        self.replicator: Replicator | None = None
        if config.remote.url is not None:
            from ..storage.remote import holder_id

            def retention(key: JobKey) -> tuple[int, float | None]:
                job = self.jobs.get(key)
                settings = job.settings if job is not None else self.config.policy
                return settings.keep_last, settings.keep_every

            self.replicator = Replicator(config.remote, holder=holder_id(config.state_dir),
                                         local_store=self.store.job, retention=retention,
                                         spawn=self._spawn,
                                         adaptive=config.throttle.enabled,
                                         pending_dir=config.state_dir / "remote-deletes")
        self.table = JobTable(self.store, policy=lambda: self.config.policy, clock=clock, poke=self.poke_job,
                              replicator=self.replicator)
        self.jobs: dict[JobKey, Job] = self.table.jobs  # the same dict: the table owns it
        self.writer = Writer(chunk_size=lambda: self.config.chunk_size, clock=clock, on_done=self._save_done,
                             max_write_rate=config.throttle.max_write_rate)
        self.io = IoControl(lambda: self.config, self.writer, clock)
        # The write-ahead log's group committer (not a logger).
        self.wal_committer = LogCommitter(functools.partial(self._spawn, "walflush"), self.poke_job)
        self._wake = anyio.Event()
        # Which jobs the scheduler decides for at its next pass, and when (issue 19): see wakeups.py.
        self.wakeups = Wakeups()
        self.writer.on_job_done = self.poke_job  # a finished save: decide for that job again
        # When the sleeping scheduler wakes up by itself (see poke_for); inf: not asleep on a timer.
        self._wake_at = math.inf
        self._save_waiters: list[anyio.Event] = []
        self._stop = anyio.Event()
        self.in_flight_by_uid: dict[int, int] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._signals: AsyncIterator[int] | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._receiver: Receiver | None = None
        # The soft fd limit (raised to the hard one at start) and the connection guard of the ipc socket.
        self.fd_limit = 1024
        self.conn_guard: ConnGuard | None = None
        # Big replies each user has queued and not yet read (quota.max_reply_bytes).
        self.replies = ReplyBudget()
        self._shared: SharedSocket | None = None
        # Per uid, logged updates a log thread answered whose request the event loop has not closed yet: not
        # in flight for the quota (their client may already send the next one).
        self._early_lock = threading.Lock()
        self._early_sent: dict[int, int] = {}
        self.reloader = Reloader(ReloadContext(config=lambda: self.config, apply_config=self.apply_config))
        self.save_durations = Histogram()
        self.writer.observe_duration = self.save_durations.observe
        self.log_sync_durations = log_sync_histogram()
        self.wal_committer.observe_sync = self.log_sync_durations.observe
        # When the rpc loop last went round: the watchdog pings only while this keeps moving.
        self.progress_at = clock()
        shm_cap = config.max_shm_bytes if config.max_shm_bytes is not None else psutil.virtual_memory().total // 2
        self.slots = SlotTable(shm_cap)
        if self.replicator is not None:
            replicator = self.replicator
            self.writer.on_commit = lambda job, version, written: replicator.committed(job.owner, job.name, version,
                                                                                      written)
            self.writer.protect = lambda job: replicator.protect(job.key)
        self.reports = Reports(ReportContext(
            config=lambda: self.config, run=self.run_state, jobs=self.jobs, jobs_of=self.table.jobs_of,
            ledger=self.table.ledger, store=self.store, writer=self.writer,
            wal=self.wal_committer, slots=self.slots, io=self.io, replicator=self.replicator, reloader=self.reloader,
            durations=self.save_durations, pid=self.pid, boot=self.boot, log_sync_durations=self.log_sync_durations,
            edge=self.edge_report,
        ))
        self.fd_server = FdServer(FdContext(config=lambda: self.config, slots=self.slots, boot=self.boot,
                                            run=self.run_state, give_to_socket_group=self._give_to_socket_group,
                                            max_conns=self.listener_cap,
                                            replies_held=lambda uid: self.replies.queued(uid)[0]))
        self.flush_ctx = FlushContext(
            config=lambda: self.config, jobs=self.jobs, writer=self.writer, clock=clock, notifier=self.notifier,
            replicator=self.replicator, begin_save=self._begin_save, wait_save_done=self._wait_save_done,
        )
        self.handlers = Handlers(RpcContext(
            config=lambda: self.config, table=self.table, slots=self.slots, wal=self.wal_committer,
            replicator=self.replicator, clock=clock, poke=self.poke_job, poke_for=self.poke_for,
            shutting_down=lambda: self.run_state.shutting_down, promote=self.writer.promote, boot=self.boot,
            pid=self.pid, uid=self.uid, status=self.reports.status, list_jobs=self.reports.list_jobs,
            reply_reserve=self.reply_reserve,
        ))

    def apply_config(self, new: Config, *, reconfigure_io: bool = True) -> None:
        """The one writer of the live config (a reload, and the startup probe's derived values): the
        throttle takes its table, every job's effective policy is recomputed as the new ``[policy]``
        defaults plus its own client overrides, and the scheduler replans."""
        if reconfigure_io:
            new = self.io.reconfigure(new)
            if self.replicator is not None and new.remote.url is not None:
                self.replicator.reconfigure(new.remote, adaptive=new.throttle.enabled)
            elif (self.replicator is None) != (new.remote.url is None):
                log.warning("config reload: turning [remote] on or off takes effect at the next start")
        self.config = new
        logging.getLogger("autosaved").setLevel(new.log_level.upper())
        for job in self.jobs.values():
            try:
                job.settings = PolicySettings.parse(job.policy_overrides or {}, base=new.policy, where="policy")
            except ConfigError as exc:  # overrides were checked when sent; this is only a safety net
                log.warning("config reload: job=%s keeps its old policy: %s", job.name, exc.message)
        self.poke()

    # -- wiring ----------------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake the scheduler to decide for every job (a reload changed every job's policy)."""
        self.wakeups.every()
        self._wake.set()

    def poke_job(self, job: Job) -> None:
        """Wake the scheduler to decide for ``job`` (a save asked for, a finished save, a full log): one
        decision, not one per job of the host (issue 19)."""
        self.wakeups.now(job.key)
        self._wake.set()

    def poke_for(self, job: Job) -> None:
        """After an update of ``job``: one ``decide``, for the job that changed (perf, issue 14). Due now:
        the scheduler decides for it at once; due later: its wake-up is kept (the earliest one), and the
        scheduler woken only if that is before its next wake-up."""
        decision = decide(job.view(), self.clock())
        if decision.reason is not None:
            self.poke_job(job)
        elif decision.next_wake_at is not None:
            self.wakeups.at(job.key, decision.next_wake_at)
            if decision.next_wake_at < self._wake_at:
                self._wake.set()

    def _spawn(self, name: str, func: Callable[..., Any], *args: Any) -> None:
        """Start a task for a helper (a job's replicator loop, a log flusher waiting for its lock),
        supervised like the daemon's own: a failure is logged and the task restarted, never the daemon's end."""
        assert self._tg is not None
        self._supervise(self._tg, name, func, *args)

    async def _replicate_stored_jobs(self, replicator: Replicator) -> None:
        """With ``[remote]``, every job on disk is attached at start: a backlog a crash left behind goes up
        without waiting for the job's trainer to come back (and is protected from retention meanwhile)."""
        replicator.resume_deletes()  # and bucket deletes a previous run left pending complete

        def scan() -> list[tuple[int, str, list[int]]]:
            return [(s.owner, s.job, s.version_ids()) for s in self.store.jobs()]

        try:
            found = await anyio.to_thread.run_sync(scan)
        except OSError as exc:
            log.warning("could not list the stored jobs to replicate: %s", exc)
            return
        for owner, name, ids in found:
            if ids:
                replicator.attach(owner, name, ids)

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

    # -- lifecycle -------------------------------------------------------------------------------

    def _socket_gid(self) -> int | None:
        group = self.config.socket_group
        if group is None or isinstance(group, int):
            return group
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise AutosavedError(f"socket_group: there is no group named {group!r}") from None

    def _prepare_paths(self, stack: contextlib.AsyncExitStack) -> None:
        # Job state is private to the daemon: clients reach it only through the daemon, which checks who
        # they are. The socket's group is the clients' group, so files must not be group-readable either.
        os.umask(0o077)
        state_dir = self.config.state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_state_dir(state_dir, self.uid)
        lock = PidLock(state_dir / "daemon.lock", f"state dir {state_dir}")
        lock.acquire()
        stack.callback(lock.release)
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
            stack.callback(sock_lock.release)
            # Unlinked while we still hold the socket lock, so these are ours: a client then fails at once
            # with "no daemon at ..." instead of waiting out its timeout on a dead socket.
            for stale in (str(sock_path), fd_socket_path(self.config.address)):
                if stale is not None:
                    stack.callback(_unlink_quietly, stale)

    def _bind(self, stack: contextlib.AsyncExitStack) -> zmq.Socket[Any]:
        # A plain socket, not zmq.asyncio: see rpcsocket.py for why and how the event loop watches it.
        ctx: zmq.Context[zmq.Socket[Any]] = zmq.Context()
        stack.callback(ctx.term)
        sock: zmq.Socket[Any] = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        # A frame over the limit makes libzmq drop that peer's connection: the cheapest defence against a
        # client that would make the daemon allocate without bound. The total over all frames is
        # checked per message, with an error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # A peer that does not read gets at most SEND_HWM replies queued; past it (or once it is gone) a
        # send fails at once (ROUTER_MANDATORY) and the reply is dropped and counted, never held.
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(self.config.address)
        except zmq.ZMQError as exc:
            sock.close(0)
            raise AutosavedError(f"cannot listen on {self.config.address}: {exc}") from None
        self._shared = SharedSocket(sock)  # log threads answer logged updates on it too
        stack.callback(self._shared.close)
        path = self.config.socket_path()
        if path is not None:
            os.chmod(path, 0o660)
            gid = self._socket_gid()
            if gid is not None:
                self._give_to_group(path, gid)
        self.conn_guard = ConnGuard(ctx, sock, None if path is None else str(path), total_cap=self.listener_cap(),
                                    per_user=lambda: self.config.quota.max_connections, lock=self._shared.lock)
        stack.callback(self.conn_guard.stop)
        return sock

    @contextlib.contextmanager
    def reply_reserve(self, uid: int, size: int) -> Iterator[None]:
        """Charge a reply being built (a restore's reads, its memfd) to ``uid``, or refuse it (quota)."""
        held = self.replies.held(uid) + self.fd_server.restore_bytes(uid)
        limit = self.config.quota.max_reply_bytes
        why = over_budget(uid, held, size, limit)
        if why is not None:
            self.replies.refused += 1
            raise QuotaExceeded(why, details={"quota": "max_reply_bytes", "used": held, "limit": limit})
        with self.replies.building_reply(uid, size):
            yield

    def edge_report(self) -> dict[str, Any]:
        """The fd limit, and the connections each capped listener holds and refused."""
        guard = self.conn_guard
        return {
            "fd_limit": self.fd_limit,
            "connection_cap": self.listener_cap(),
            "ipc": {"open": guard.total if guard else 0, "peak": guard.peak if guard else 0,
                    "refused": guard.refused if guard else 0, "closed": guard.closed if guard else False,
                    "missed_disconnects": guard.reconciled if guard else 0},
            "fd_socket": {"open": sum(self.fd_server.by_uid.values()), "refused": self.fd_server.refused},
            "job_locks": self.table.locks_held(),
            "requests_in_flight": sum(self.in_flight_by_uid.values()),
            "replies": {"queued_bytes": self.replies.total(),
                        "dropped": self.replies.dropped + (self._shared.dropped if self._shared else 0),
                        "refused": self.replies.refused,
                        "restore_buffer_bytes": self.fd_server.restore_bytes(None)},
        }

    def listener_cap(self) -> int:
        """Connections each listener may hold at once (``max_connections``, fitted to the fd limit)."""
        return listener_cap(self.config.max_connections, self.fd_limit)

    def _give_to_socket_group(self, path: Path) -> None:
        gid = self._socket_gid()
        if gid is not None:
            self._give_to_group(path, gid)

    def _give_to_group(self, path: Path, gid: int) -> None:
        try:
            os.chown(path, -1, gid)
        except OSError as exc:
            raise AutosavedError(
                f"socket_group: cannot give {path} to group {self.config.socket_group!r}: {exc.strerror}; the "
                "daemon's user must be a member of that group (under systemd, set Group= instead)"
            ) from None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        # Teardown in one place, in reverse order of setup: each resource registers its undo the moment
        # it is acquired (socket, zmq context, stale socket files, socket lock, state-dir lock, notifier).
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._stopped)
            self._prepare_paths(stack)
            await self._serve(stack, task_status)
        return self.run_state.exit_code

    async def _serve(self, stack: contextlib.AsyncExitStack, task_status: anyio.abc.TaskStatus[None]) -> None:
        # The signal handlers go in before anything can answer a client: a SIGTERM sent right after the
        # first reply (a supervisor's readiness probe, then a stop) must reach the flush, never the default
        # action. Signals that come before the signal task runs wait in the receiver.
        self._signals = stack.enter_context(anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
        try:
            # Before serving, so every job starts with the derived dirty_bytes and no client ever sees the
            # probe's temp file.
            self.apply_config(await self.io.measure_speed(), reconfigure_io=False)
            self.fd_limit = raise_nofile()
            if self.listener_cap() < self.config.max_connections:
                log.warning("the fd limit (%d) holds only %d connections per listener, not max_connections=%d; "
                            "raise LimitNOFILE", self.fd_limit, self.listener_cap(), self.config.max_connections)
            remote_up = True
            if self.replicator is not None:
                # A store that ignores If-None-Match is refused here, before serving (the error says why).
                remote_up = await self.replicator.probe(min(5.0, self.config.remote.timeout))
            # Bound only now, right before the rpc loop reads it: a request sent to a socket nobody reads
            # (during the probe, up to [remote] timeout) times out at the client, which then sends again on
            # a new connection, yet it stayed queued here and was merged once the loop started, possibly
            # after that newer update (ZeroMQ fair-queues between connections; the soak's mixed states).
            self._sock = self._bind(stack)
            metrics = await open_metrics(*self.config.metrics_address) if self.config.metrics_address else None
            async with anyio.create_task_group() as tg:
                self._tg = tg
                fd_path = fd_socket_path(self.config.address)
                if fd_path is not None:
                    # Before the rpc loop: a client that got an answer may use the fd socket right away.
                    await tg.start(self.fd_server.run, fd_path)
                self._supervise(tg, "rpc", self._rpc_loop)
                self._supervise(tg, "scheduler", self._scheduler_loop)
                self._supervise(tg, "signals", self._signal_loop)
                self._supervise(tg, "reloader", self.reloader.watch)
                self._supervise(tg, "watchdog", self._watchdog)
                if metrics is not None:
                    self._supervise(tg, "metrics", serve_metrics, metrics, self.reports.metrics_sample,
                                    self.listener_cap(), self._health)
                self._supervise(tg, "iocontrol", self.io.run)
                if self.replicator is not None and not remote_up:
                    self._supervise(tg, "probe", self.replicator.probe_later)
                if self.replicator is not None:
                    self._supervise(tg, "attach", self._replicate_stored_jobs, self.replicator)
                    self._supervise(tg, "uploadrate", self.replicator.rate.run, self.replicator.store.endpoint,
                                    self.config.throttle.sample_interval)
                if self.config.preemption.provider != "off":
                    self._supervise(tg, "preemption", self._preemption_loop)
                log.info("serving address=%s state_dir=%s pid=%d version=%s", self.config.address,
                         self.config.state_dir, self.pid, __version__)
                self.run_state.phase = Phase.SERVING
                self.notifier.ready(f"serving {self.config.address}")
                task_status.started()
                await self._stop.wait()
                flush_started = self.clock()
                point("task", "main", "before")  # the supervision tests make an error escape from here
                await self._flush_all()
                await drain_remote(self.flush_ctx, flush_started)
                tg.cancel_scope.cancel()
        except Exception:
            # Nothing should get here (every task is supervised); if something does, what was accepted is
            # saved before the daemon exits, never dropped with it.
            log.exception("unexpected error; saving every dirty job, then exiting")
            self.run_state.exit_code = 1
            await self._last_chance_flush()

    def _stopped(self) -> None:
        self.notifier.close()
        self.run_state.phase = Phase.STOPPED

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
                    self.run_state.task_failures += 1
                    self.run_state.failing_until[name] = failing_until(time.monotonic(), backoff)
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
        assert self._signals is not None
        async for signum in self._signals:
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
                self.run_state.preempted = notice.detail
                self.writer.bucket.bypass = True
                await self._flush_all(reason=SaveReason.PREEMPTION)
                return
            await anyio.sleep(settings.poll_interval)

    async def _flush_all(self, reason: SaveReason = SaveReason.SHUTDOWN) -> None:
        final = reason is SaveReason.SHUTDOWN
        if final:
            self.run_state.phase = Phase.FLUSHING  # updates are refused from now on
        missed = await flush_all(self.flush_ctx, reason)
        if missed and final:
            self.run_state.exit_code = 1

    def _begin_save(self, job: Job, reason: SaveReason) -> None:
        assert self._tg is not None
        self.writer.begin(job, reason, self._tg)

    # -- scheduler -------------------------------------------------------------------------------

    async def _scheduler_loop(self) -> None:
        assert self._tg is not None
        # A (re)started scheduler decides for every job once: nothing a failed pass had taken is lost.
        self.wakeups.every()
        while True:
            self._wake = anyio.Event()
            point("task", "scheduler", "before")
            now = self.clock()
            if not self.run_state.shutting_down:
                # Only the jobs something asked for, or whose wake-up came (every job after a reload).
                keys = self.wakeups.take(now)
                for key in list(self.jobs) if keys is None else keys:
                    job = self.jobs.get(key)
                    if job is None or job.deleted:
                        continue
                    decision = decide(job.view(), now)
                    if decision.reason is not None:
                        self.writer.begin(job, decision.reason, self._tg)
                    elif decision.next_wake_at is not None:
                        self.wakeups.at(key, decision.next_wake_at)
            # Shutting down: the flush saves every job; the scheduler only waits (as before, for a poke).
            wake_at = math.inf if self.run_state.shutting_down else self.wakeups.next_at()
            self._wake_at = wake_at
            with anyio.move_on_after(max(0.0, wake_at - now)):
                await self._wake.wait()

    # -- rpc -------------------------------------------------------------------------------------

    async def _rpc_loop(self) -> None:
        assert self._sock is not None and self._tg is not None
        assert self._shared is not None
        with Receiver(self._sock, self._handle, self._shared.lock) as receiver:
            self._receiver = self._shared.receiver = receiver
            try:
                while True:
                    self.progress_at = self.clock()
                    if faults.active():  # the tests' hung event loop (loop.tick) and stalled rpc loop (rpc.poll)
                        faults.point("loop", "tick", "before")
                        await anyio.to_thread.run_sync(faults.point, "rpc", "poll", "before")
                    # Requests are received and started from the socket's fd callback for a second, then
                    # the loop goes round (the watchdog's proof of progress); see rpcsocket.py.
                    await receiver.serve(1.0)
                    self.replies.sweep()
            finally:
                self._receiver = self._shared.receiver = None

    def _handle(self, frames: list[zmq.Frame]) -> None:
        """Start one request: answered here when it needs no waiting (most small updates), else handed
        to a task of its own that answers when it is done."""
        if len(frames) < 2:
            return  # nothing to answer: a ROUTER frame with no content
        identity = frames[0].bytes
        self.run_state.requests += 1
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
            counted = self.in_flight_by_uid.get(owner, 0)
            # A request counts until its reply has left: big replies still queued in libzmq count too.
            in_flight = counted - self._early_sent.get(owner, 0) + self.replies.queued(owner)[1]
            if in_flight >= self.config.quota.max_requests:
                raise QuotaExceeded(
                    f"quota.max_requests: uid {owner} already has {in_flight} requests in flight (the limit is "
                    f"{self.config.quota.max_requests}); wait for their replies",
                    details={"quota": "max_requests", "limit": self.config.quota.max_requests, "used": in_flight},
                )
            request = RpcRequest(op=op, seq=seq, header=header, frames=[f.buffer for f in frames[2:]],
                                 owner=owner, header_size=len(header_frame))
            self.in_flight_by_uid[owner] = counted + 1
            try:
                started = self.handlers.start(request)
            except BaseException:
                self._done(owner)
                raise
        except Exception as exc:
            self._send_error(identity, seq, exc)
            return
        if isinstance(started, Reply):
            self._answer(identity, seq, owner, started)
        elif isinstance(started, Deferred):
            deferred = started
            deferred.early = lambda reply: self._answer_early(identity, seq, owner, reply)
            deferred.on_done(lambda result: self._answered(owner) if deferred.sent_early
                             else self._answer(identity, seq, owner, result))
        else:
            assert self._tg is not None
            self._tg.start_soon(self._finish, identity, seq, owner, started)

    def _answer(self, identity: bytes, seq: int, owner: int, result: Reply | Exception) -> None:
        """Send a request's one reply (an error reply for an exception, or for a reply that cannot be sent)."""
        self._done(owner)
        if isinstance(result, Reply):
            try:
                size = sum(memoryview(f).nbytes for f in result.frames)
                if size >= TRACK_MIN:
                    held = self.replies.held(owner) + self.fd_server.restore_bytes(owner)
                    why = over_budget(owner, held, size, self.config.quota.max_reply_bytes)
                    if why is not None:
                        self.replies.dropped += 1
                        raise QuotaExceeded(why, details={"quota": "max_reply_bytes", "used": held,
                                                          "limit": self.config.quota.max_reply_bytes})
                self._send(identity, ok_reply(seq, self.boot, **result.fields), result.frames,
                           track_for=owner if size >= TRACK_MIN else None, size=size)
                return
            except Exception as exc:
                result = exc
        self._send_error(identity, seq, result)

    def _answer_early(self, identity: bytes, seq: int, owner: int, reply: Reply) -> bool:
        """From a log thread, right after the sync: send a logged update's reply (False: not sent, the
        event loop answers as usual). The event loop closes the request later (:meth:`_answered`)."""
        frames = [identity, pack_header(ok_reply(seq, self.boot, **reply.fields)), *reply.frames]
        with self._early_lock:  # counted before the client can see the reply and send its next request
            self._early_sent[owner] = self._early_sent.get(owner, 0) + 1
        if self._shared is not None and self._shared.send_from_thread(frames):
            return True
        self._uncount_early(owner)
        return False

    def _answered(self, owner: int) -> None:
        self._uncount_early(owner)
        self._done(owner)

    def _uncount_early(self, owner: int) -> None:
        with self._early_lock:
            left = self._early_sent[owner] - 1
            if left:
                self._early_sent[owner] = left
            else:
                del self._early_sent[owner]

    async def _finish(self, identity: bytes, seq: int, owner: int, started: Coroutine[Any, Any, Reply]) -> None:
        """The rest of a request that had to wait (a load from disk, a save), and its reply."""
        try:
            result: Reply | Exception = await started
        except Exception as exc:
            result = exc
        except BaseException:
            self._done(owner)
            raise
        self._answer(identity, seq, owner, result)

    def _done(self, owner: int) -> None:
        left = self.in_flight_by_uid[owner] - 1
        if left:
            self.in_flight_by_uid[owner] = left
        else:
            del self.in_flight_by_uid[owner]

    def _health(self) -> tuple[bool, str]:
        return health(self.run_state.phase, self.run_state.failing_until, time.monotonic())

    def _send_error(self, identity: bytes, seq: int | None, exc: Exception) -> None:
        self.run_state.errors += 1
        if getattr(exc, "code", None) == "quota":
            self.run_state.quota_refusals += 1
        if isinstance(exc, AutosavedError):
            if not isinstance(exc, ProtocolError):
                log.info("request failed seq=%s code=%s error=%s", seq, exc.code, exc.message)
            else:
                log.warning("bad request seq=%s: %s", seq, exc.message)
            error = exc
        else:
            log.error("internal error handling a request", exc_info=exc)
            error = InternalError(f"internal error: {exc!r}")
        self._send(identity, error_reply(seq, self.boot, error), ())

    def owner_of(self, header_frame: Any) -> int:
        """Whose request this is. tcp carries no identity: it is the documented trusted-only setup, where
        every peer acts as the daemon's own user. On ipc an identity the kernel did not tell is refused."""
        if self.config.address.startswith("tcp://"):
            return self.uid
        uid = peer_uid(header_frame)
        if uid is None:
            raise Forbidden("cannot tell which user sent this request (no peer credentials); refused")
        return uid

    def _send(self, identity: bytes, header: dict[str, Any], frames: Any, *, track_for: int | None = None,
              size: int = 0) -> None:
        """Send a reply now. A ROUTER's send never blocks, and a sync send is whole before anything else
        runs, so replies need no lock and no await. A big reply is charged to ``track_for`` until libzmq
        lets go of it; a reply that cannot be queued is dropped and counted (SharedSocket.dropped)."""
        assert self._shared is not None
        pending, tracker = self._shared.send([identity, pack_header(header), *frames], track=track_for is not None)
        if track_for is not None and tracker is not None and not tracker.done:
            self.replies.add(track_for, tracker, size)
        if pending and self._receiver is not None:
            self._receiver.after_send()

    # -- reports ---------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        # The rpc loop polls with a 1 s timeout, so it goes round at least once a second while healthy.
        period = (self.notifier.watchdog_interval or 0.0) * 2
        await watchdog_loop(self.notifier, progress_at=lambda: self.progress_at, clock=self.clock,
                            status=self.reports.status_line, stale_after=max(period, 3.0))


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def serve(config: Config) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; returns the exit code."""
    daemon = Daemon(config)
    return anyio.run(daemon.run, backend="asyncio")

