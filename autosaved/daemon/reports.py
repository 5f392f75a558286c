"""What the daemon reports: systemd's one-line STATUS=, the ``status`` and ``list`` replies, and the
sample the metrics endpoint renders. Reads only; it gets a narrow context, never the daemon."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from .. import __version__
from ..deadline import estimate_s
from ..tree import Walked
from .jobs import Job, JobKey
from .metrics import CacheSample, Frozen, Histogram, JobSample, RemoteSample, ReplicaSample, Sample
from .runstate import RunState

if TYPE_CHECKING:
    from ..config import Config
    from ..storage.base import Storage
    from .accounting import Ledger
    from .iocontrol import IoControl
    from .reload import Reloader
    from .replicator import Replicator
    from .slottable import SlotTable
    from .statecache import StateCache
    from .walcommit import LogCommitter
    from .writer import Writer


@dataclass(frozen=True)
class ReportContext:
    config: Callable[[], Config]
    run: RunState
    jobs: Mapping[JobKey, Job]
    # One owner's loaded jobs (every one's for None): O(what it returns), never a scan of all jobs.
    jobs_of: Callable[[int | None], list[Job]]
    ledger: Ledger
    store: Storage
    writer: Writer
    wal: LogCommitter
    slots: SlotTable
    io: IoControl
    replicator: Replicator | None
    reloader: Reloader
    durations: Histogram
    pid: int
    boot: str
    log_sync_durations: Histogram | None = None
    # What the daemon's edge holds and refused (connections, the fd limit): see Daemon.edge_report.
    edge: Callable[[], dict[str, Any]] = dict
    # The jobs' trees within memory_limit (statecache.py): its size, limit, hits, loads and evictions.
    cache: StateCache | None = None


class Reports:
    def __init__(self, ctx: ReportContext) -> None:
        self.ctx = ctx

    def status_line(self) -> str:
        """One line for systemd's STATUS=: jobs, unsaved bytes, the newest save."""
        jobs = list(self.ctx.jobs.values())
        dirty = [j for j in jobs if j.dirty]
        newest = max((j for j in jobs if j.last_save_time), key=lambda j: j.last_save_time or "", default=None)
        last = (f"last save {newest.name} v{newest.latest_version} at {newest.last_save_time}"
                if newest is not None else "no save yet")
        failing = sum(1 for j in jobs if j.last_error)
        return (f"{len(jobs)} jobs, {len(dirty)} dirty ({sum(j.dirty_bytes for j in dirty)} bytes unsaved), "
                f"{last}" + (f", {failing} failing" if failing else ""))

    def metrics_sample(self) -> Sample:
        run, writer, reloader = self.ctx.run, self.ctx.writer, self.ctx.reloader
        return Sample(
            uptime_s=time.time() - run.started_at, requests=run.requests, request_errors=run.errors,
            saves=writer.saves, save_failures=writer.failures, bytes_written=writer.bytes_written,
            reloads=reloader.reloads, reload_failures=reloader.failures, task_restarts=run.task_failures,
            durations=self.ctx.durations, log_syncs=self.ctx.wal.syncs,
            log_sync_durations=None if self.ctx.log_sync_durations is None else Frozen(self.ctx.log_sync_durations),
            quota_refusals=run.quota_refusals, expired=run.expired,
            throttle_rate=self._throttle_rate(), remote=self._remote_sample(), cache=self._cache_sample(),
            jobs=tuple(
                JobSample(job=j.name, owner=j.owner, saves=j.saves, bytes_written=j.bytes_written,
                          dirty_bytes=j.dirty_bytes, held_bytes=j.held_bytes(), state_bytes=j.root.cost,
                          consecutive_failures=j.failures,
                          saving=j.saving, last_save_time=j.last_save_time)
                for j in self.ctx.jobs.values()
            ),
        )

    def _cache_sample(self) -> CacheSample | None:
        c = self.ctx.cache
        if c is None:
            return None
        return CacheSample(nbytes=c.total, limit=c.limit(), hits=c.hits, loads=c.loads, evictions=c.evictions)

    def _throttle_rate(self) -> float | None:
        """The pacing rate of background saves, when one applies (unlimited: no series)."""
        rate = self.ctx.writer.bucket.effective_rate()
        return None if math.isinf(rate) else rate

    def _remote_sample(self) -> RemoteSample | None:
        """The replicator's counters: O(jobs it holds + their queued versions), no walk of any tree."""
        rep = self.ctx.replicator
        if rep is None:
            return None
        replicas = tuple(
            ReplicaSample(job=name, owner=owner, replicated=r.replicated, fenced=r.fenced is not None,
                          backlog_bytes=r.backlog_bytes)
            for (owner, name), r in rep.replicas.items())
        return RemoteSample(bytes_uploaded=rep.bytes_uploaded, upload_errors=rep.upload_errors, replicas=replicas)

    @staticmethod
    def _save_progress(job: Job, now: float) -> dict[str, Any]:
        """A running save's elapsed time and write rate so far (``autosaved top``)."""
        if not job.saving or job.save_started_at is None:
            return {}
        elapsed = max(1e-6, now - job.save_started_at)
        return {"save_elapsed_s": round(elapsed, 3), "save_rate": round(job.save_written / elapsed)}

    def status(self, owner: int | None) -> dict[str, Any]:
        speed = self.ctx.writer.flush_speed()
        now = self.ctx.writer.clock()
        jobs = [{**j.status(), "flush_estimate_s": round(estimate_s(j.dirty_bytes, speed), 3) if j.dirty else 0.0,
                 **self._save_progress(j, now),
                 **({"remote": self.ctx.replicator.status(j.key)} if self.ctx.replicator is not None else {})}
                for j in self.ctx.jobs_of(owner)]
        return {
            "daemon": {
                "pid": self.ctx.pid,
                "boot": self.ctx.boot,
                "version": __version__,
                "address": self.ctx.config().address,
                "state_dir": str(self.ctx.config().state_dir),
                "uptime_s": round(time.time() - self.ctx.run.started_at, 3),
                "shutting_down": self.ctx.run.shutting_down,
                "requests": self.ctx.run.requests,
                "errors": self.ctx.run.errors,
                "task_restarts": self.ctx.run.task_failures,
                "saves": self.ctx.writer.saves,
                "save_failures": self.ctx.writer.failures,
                "bytes_written": self.ctx.writer.bytes_written,
                "wal_syncs": self.ctx.wal.syncs,
                "wal_records": self.ctx.wal.records,
                "held_bytes": self.ctx.ledger.held_bytes,
                # Counters, never a walk (issue 19): the cost of the held states (what quota.max_bytes
                # counts), the slot mappings they read, and the tree entries every walk visited so far.
                "state_bytes": self.ctx.ledger.state_total,
                "referenced_slot_mappings": len(self.ctx.ledger.refs),
                "tree_entries_walked": Walked.entries,
                "tree_entries_copied": Walked.copied,
                "rss_bytes": psutil.Process().memory_info().rss,
                "shm": self.ctx.slots.report(),
                "preempted": self.ctx.run.preempted,
                "throttle": self.ctx.io.status(),
                "remote": self.ctx.replicator.summary() if self.ctx.replicator is not None else None,
                "edge": self.ctx.edge(),
                "cache": ({**self.ctx.cache.status(), "owner_bytes": self.ctx.ledger.cached_of(owner)}
                          if self.ctx.cache is not None and owner is not None else
                          self.ctx.cache.status() if self.ctx.cache is not None else None),
            },
            "jobs": jobs,
        }

    def list_jobs(self, owner: int | None) -> list[dict[str, Any]]:
        """Jobs on disk and in memory (runs in a worker thread: it lists directories)."""
        out: dict[tuple[int, str], dict[str, Any]] = {}
        for store in self.ctx.store.jobs(owner):
            try:
                ids = store.version_ids()
                entry = {
                    "job": store.job, "owner": store.owner, "versions": len(ids),
                    "latest": ids[-1] if ids else None, "bytes": store.stored_bytes(),
                    # A job not loaded may still hold logged updates past its newest version.
                    "dirty": (store.owner, store.job) not in self.ctx.jobs and store.unsaved_log_records() > 0,
                }
            except FileNotFoundError:
                continue  # deleted while we listed it (found by the daemon fuzz loop: an internal error before)
            out[(store.owner, store.job)] = entry
        for job in self.ctx.jobs_of(owner):
            entry = out.setdefault(
                job.key, {"job": job.name, "owner": job.owner, "versions": 0, "latest": None, "bytes": 0}
            )
            entry["dirty"] = job.dirty
        return sorted(out.values(), key=lambda e: (e["owner"], e["job"]))
