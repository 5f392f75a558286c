"""The daemon's lifecycle: startup → serve → flush → exit.

Structure (after uvicorn and apscheduler 4): ``Daemon.run`` acquires the locks (paths.py), binds the
socket, starts the rpc server (rpcserver.py), the scheduler (scheduler.py) and the signal watcher in one
anyio task group, each supervised (supervise.py), tells systemd READY=1, and waits for a stop request.
Signal handlers only set that request; the flush then happens in the main flow: new updates are refused
(``shutting_down``), every dirty job is committed, and only then does the task group close. ``Daemon``
builds every helper's narrow context and owns this lifecycle; the work is in the helpers.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.to_thread
import psutil

from .. import __version__
from ..config import Config, PolicySettings
from ..errors import ConfigError
from ..policy import SaveReason
from ..shm import fd_socket_path
from ..storage.faults import point
from ..storage.local import Store
from . import gcpolicy, loopfirst, offload, preempt
from .fdlimit import listener_cap, raise_nofile
from .fdserver import FdContext, FdServer
from .flush import FlushContext, drain_remote, flush_all
from .health import health
from .iocontrol import IoControl
from .jobs import Job, JobKey
from .jobtable import JobTable
from .metrics import Histogram, log_sync_histogram, open_metrics, serve_metrics
from .notify import Notifier, watchdog_loop
from .paths import give_to_socket_group, prepare_paths
from .reload import ReloadContext, Reloader
from .replicator import Replicator
from .reports import ReportContext, Reports
from .rpc import Handlers, RpcContext
from .rpcserver import RpcServer, RpcServerContext
from .runstate import Phase, RunState
from .scheduler import Scheduler, SchedulerContext
from .slottable import SlotTable
from .statecache import memory_limit
from .supervise import supervise
from .walcommit import LogCommitter
from .writer import Writer

log = logging.getLogger("autosaved.daemon")


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
        self.scheduler = Scheduler(SchedulerContext(
            clock=clock, jobs=lambda: self.jobs, shutting_down=lambda: self.run_state.shutting_down,
            begin_save=self._begin_save,
        ))
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
        self.table = JobTable(self.store, policy=lambda: self.config.policy, clock=clock, poke=self.scheduler.poke_job,
                              replicator=self.replicator, memory_limit=lambda: memory_limit(self.config.memory_limit))
        self.jobs: dict[JobKey, Job] = self.table.jobs  # the same dict: the table owns it
        self.writer = Writer(chunk_size=lambda: self.config.chunk_size, clock=clock, on_done=self.scheduler.save_done,
                             max_write_rate=config.throttle.max_write_rate)
        self.writer.on_job_done = self.table.job_saved  # a finished save: decide for that job again, evict
        self.io = IoControl(lambda: self.config, self.writer, clock)
        # The write-ahead log's group committer (not a logger).
        self.wal_committer = LogCommitter(functools.partial(self._spawn, "walflush"), self.scheduler.poke_job)
        self._stop = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._signals: AsyncIterator[int] | None = None
        self.fd_limit = 1024  # the soft fd limit (raised to the hard one at start)
        self.reloader = Reloader(ReloadContext(config=lambda: self.config, apply_config=self.apply_config))
        self.save_durations = Histogram()
        self.writer.observe_duration = self.save_durations.observe
        self.log_sync_durations = log_sync_histogram()
        self.wal_committer.observe_sync = self.log_sync_durations.observe
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
            durations=self.save_durations, pid=self.pid, boot=self.boot, edge=self.edge_report,
            log_sync_durations=self.log_sync_durations, cache=self.table.cache,
        ))
        self.fd_server = FdServer(FdContext(config=lambda: self.config, slots=self.slots, boot=self.boot,
                                            run=self.run_state, give_to_socket_group=self._give_to_socket_group,
                                            max_conns=self.listener_cap,
                                            replies_held=lambda uid: self.rpc.replies.queued(uid)[0]))
        self.flush_ctx = FlushContext(
            config=lambda: self.config, jobs=self.jobs, writer=self.writer, clock=clock, notifier=self.notifier,
            replicator=self.replicator, begin_save=self._begin_save, wait_save_done=self.scheduler.wait_save_done,
        )
        self.handlers = Handlers(RpcContext(
            config=lambda: self.config, table=self.table, slots=self.slots, wal=self.wal_committer,
            replicator=self.replicator, clock=clock, poke=self.scheduler.poke_job, poke_for=self.scheduler.poke_for,
            shutting_down=lambda: self.run_state.shutting_down, promote=self.writer.promote, boot=self.boot,
            pid=self.pid, uid=self.uid, status=self.reports.status, list_jobs=self.reports.list_jobs,
            reply_reserve=lambda uid, size: self.rpc.reply_reserve(uid, size),
        ))
        self.rpc = RpcServer(RpcServerContext(
            config=lambda: self.config, start=self.handlers.start, run=self.run_state, clock=clock, boot=self.boot,
            uid=self.uid, give_to_socket_group=self._give_to_socket_group, listener_cap=self.listener_cap,
            restore_bytes=self.fd_server.restore_bytes,
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
        self.scheduler.poke()
        self.table.cache.settle()  # a lower memory_limit evicts now

    # -- wiring ----------------------------------------------------------------------------------

    def _spawn(self, name: str, func: Callable[..., Any], *args: Any) -> None:
        """Start a task for a helper (a job's replicator loop, a log flusher waiting for its lock),
        supervised like the daemon's own: a failure is logged and the task restarted, never the daemon's end."""
        assert self._tg is not None
        self._supervise(self._tg, name, func, *args)

    def request_stop(self) -> None:
        self._stop.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> int:
        # Teardown in one place, in reverse order of setup: each resource registers its undo the moment
        # it is acquired (socket, zmq context, stale socket files, socket lock, state-dir lock, notifier).
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self._stopped)
            prepare_paths(self.config, self.uid, stack)
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
            self.rpc.bind(stack)
            metrics = await open_metrics(*self.config.metrics_address) if self.config.metrics_address else None
            async with anyio.create_task_group() as tg:
                self._tg = tg
                fd_path = fd_socket_path(self.config.address)
                if fd_path is not None:
                    # Before the rpc loop: a client that got an answer may use the fd socket right away.
                    await tg.start(self.fd_server.run, fd_path)
                self._supervise(tg, "rpc", self.rpc.run, tg)
                self._supervise(tg, "scheduler", self.scheduler.run)
                self._supervise(tg, "signals", self._signal_loop)
                self._supervise(tg, "reloader", self.reloader.watch)
                self._supervise(tg, "watchdog", self._watchdog)
                self._supervise(tg, "collector", gcpolicy.full_collections)
                if metrics is not None:
                    self._supervise(tg, "metrics", serve_metrics, metrics, self.reports.metrics_sample,
                                    self.listener_cap(), self._health)
                self._supervise(tg, "iocontrol", self.io.run)
                if self.replicator is not None and not remote_up:
                    self._supervise(tg, "probe", self.replicator.probe_later)
                if self.replicator is not None:
                    self._supervise(tg, "attach", self.table.replicate_stored_jobs, self.replicator)
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

    def edge_report(self) -> dict[str, Any]:
        """The fd limit, and the connections each capped listener holds and refused."""
        return {"fd_limit": self.fd_limit, "connection_cap": self.listener_cap(),
                "fd_socket": {"open": sum(self.fd_server.by_uid.values()), "refused": self.fd_server.refused},
                "job_locks": self.table.locks_held(), **self.rpc.edge_report()}

    def listener_cap(self) -> int:
        """Connections each listener may hold at once (``max_connections``, fitted to the fd limit)."""
        return listener_cap(self.config.max_connections, self.fd_limit)

    def _give_to_socket_group(self, path: Path) -> None:
        give_to_socket_group(self.config, path)

    def _supervise(self, tg: anyio.abc.TaskGroup, name: str, func: Callable[..., Any], *args: Any) -> None:
        supervise(tg, self.run_state, name, func, *args)

    def _health(self) -> tuple[bool, str]:
        return health(self.run_state.phase, self.run_state.failing_until, time.monotonic())

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
        await preempt.watch(self.config.preemption, self._preempted)

    async def _preempted(self, notice: preempt.Notice) -> None:
        log.warning("preemption notice (%s): saving every dirty job now", notice.detail)
        self.run_state.preempted = notice.detail
        self.writer.bucket.bypass = True
        await self._flush_all(reason=SaveReason.PREEMPTION)

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

    # -- reports ---------------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        # The rpc loop polls with a 1 s timeout, so it goes round at least once a second while healthy.
        period = (self.notifier.watchdog_interval or 0.0) * 2
        await watchdog_loop(self.notifier, progress_at=lambda: self.rpc.progress_at, clock=self.clock,
                            status=self.reports.status_line, stale_after=max(period, 3.0))


def serve(config: Config) -> int:
    """Run a daemon in this process until SIGTERM/SIGINT; returns the exit code."""
    daemon = Daemon(config)
    # the rpc loop gets the GIL back quickly from a thread decoding a big request; each user's decodes
    # are charged to quota.cpu_share
    offload.install(lambda: daemon.config.quota.cpu_share)
    gcpolicy.install()  # full collections on a timer (gcpolicy.full_collections), not every few seconds
    loopfirst.install()  # a worker decoding a big request waits while the loop has work
    return anyio.run(daemon.run, backend="asyncio", backend_options={"loop_factory": loopfirst.new_event_loop})

