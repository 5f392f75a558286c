"""Lightning: a ``CheckpointIO`` that writes through the daemon, and a per-step checkpoint callback.

    from autosaved.integrations.lightning import AutosavedCallback, AutosavedCheckpointIO
    trainer = L.Trainer(plugins=[AutosavedCheckpointIO("my-run")], callbacks=[AutosavedCallback("my-run")])
    trainer.fit(model, ckpt_path="autosaved://my-run")    # resumes, or starts fresh when the job is new

Everything Lightning saves through its checkpoint IO (``ModelCheckpoint``, ``trainer.save_checkpoint``, the
per-step :class:`AutosavedCallback`) becomes state of one autosaved job::

    saves/<n>     a checkpoint dict as Lightning built it (tensors kept as tensors, int keys as ints)
    paths/<path>  the save that answers that path (what ModelCheckpoint names and later removes)
    newest        the save ``autosaved://<job>`` answers

Each save is one atomic update that adds the new checkpoint and drops the one it replaces (a path saved
again, as the per-step callback does), so the daemon holds the checkpoints Lightning keeps, not every one it
ever wrote; ``remove_checkpoint`` drops one. Its content-addressed store writes only changed chunks.

``load_checkpoint("autosaved://<job>")`` returns the newest save (from a restarted daemon too: it replays its
write-ahead log first), and for a job with no state yet an empty checkpoint Lightning treats as "nothing to
restore", so the same ``fit(ckpt_path=...)`` serves the first run and every resume. Paths this IO never saved
are read as ordinary checkpoint files, as ``TorchCheckpointIO`` would.

``wait`` is the SDK's ack level for every save (``"logged"``: survives SIGKILL of the trainer and of the
daemon). Under ``AsyncCheckpointIO(AutosavedCheckpointIO(...))`` saves run in Lightning's background
thread (the sync client is guarded by a lock); a resume then starts from the last save that was acked.

Loop progress is restored by Lightning; resuming mid-epoch at "the batch after step k" needs a dataloader
Lightning can restore (one with ``state_dict``/``load_state_dict``, e.g. torchdata's ``StatefulDataLoader``),
as with any Lightning checkpoint.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning import __version__ as lightning_version
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO

from ..client import Client
from ..tree import DELETE

__all__ = ["SCHEME", "AutosavedCallback", "AutosavedCheckpointIO"]

SCHEME = "autosaved://"


class _NoCheckpoint(dict[str, Any]):
    """What a job with no state loads as: Lightning's restore steps all begin ``if not checkpoint: return``,
    and its version migration reads the version key first — so falsy, with the running version."""

    def __bool__(self) -> bool:
        return False


# Where Lightning's rank_zero_info logs (the pytorch and fabric copies of lightning_utilities' module).
_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


class _FreshStartNote(logging.Filter):
    """After ``fit(ckpt_path="autosaved://JOB")`` Lightning logs "Restored all states from the checkpoint at
    autosaved://JOB" even when the job had nothing to restore (issue 22): rewrite that one line to say the
    run starts from scratch, then step aside."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.uri = uri

    def install(self) -> None:
        for name in _RANK_ZERO_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().endswith(f" from the checkpoint at {self.uri}"):
            record.msg, record.args = f"{self.uri} has no checkpoint yet: training starts from scratch", ()
            for name in _RANK_ZERO_LOGGERS:
                logging.getLogger(name).removeFilter(self)
        return True


class AutosavedCheckpointIO(CheckpointIO):
    """Lightning checkpoint IO into autosaved job ``job`` at ack level ``wait``."""

    def __init__(self, job: str, *, address: str | None = None, wait: str = "logged", timeout: float = 600.0) -> None:
        super().__init__()
        if wait not in ("accepted", "logged", "committed"):
            raise ValueError(f"wait must be 'accepted', 'logged' or 'committed', not {wait!r}")
        self.job = job
        self.address = address
        self.wait = wait
        self._timeout = timeout
        self._client = Client(job, address=address, timeout=timeout, save_timeout=timeout)
        self._lock = threading.Lock()
        self._index: tuple[dict[str, str], int] | None = None  # path → save key, next save number
        self._files = TorchCheckpointIO()

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.job}"

    def _paths(self) -> tuple[dict[str, str], int]:
        if self._index is None:
            self._client.connect()  # hello: a restarted daemon replays the job's write-ahead log
            paths, number = self._client.restore(paths=[("paths",), ("next",)])
            self._index = (dict(paths or {}), int(number or 1))
        return self._index

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AutosavedCheckpointIO.save_checkpoint takes no storage_options "
                            f"(got {storage_options!r})")
        where = str(path)
        with self._lock:
            paths, number = self._paths()
            key = f"{number:012d}"
            delta: dict[str, Any] = {"saves": {key: checkpoint}, "paths": {where: key}, "newest": key,
                                     "next": number + 1}
            old = paths.get(where)
            if old is not None:
                delta["saves"][old] = DELETE
            step = checkpoint.get("global_step")
            self._client.update(delta, step=step if isinstance(step, int) else None, wait=self.wait)
            paths[where] = key
            self._index = (paths, number + 1)

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        where = str(path)
        if where.startswith(SCHEME) and where[len(SCHEME):] != self.job:
            with AutosavedCheckpointIO(where[len(SCHEME):], address=self.address, timeout=self._timeout) as other:
                return other.load_checkpoint(where, map_location, weights_only)
        with self._lock:
            paths, _ = self._paths()
            if where == self.uri:
                key = self._client.restore(path=("newest",))
                if key is None:
                    _FreshStartNote(self.uri).install()
                    return _NoCheckpoint({"pytorch-lightning_version": lightning_version})
            elif where in paths:
                key = paths[where]
            else:
                key = None
            if key is not None:
                loaded = self._client.restore(path=("saves", key), tensors="torch")
                if loaded is None:
                    raise FileNotFoundError(f"{where}: the save it names is gone from autosaved job {self.job!r}")
                return dict(loaded)
        if not Path(where).exists():
            raise FileNotFoundError(f"{where}: neither saved through autosaved job {self.job!r} nor a file")
        return self._files.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        where = str(path)
        with self._lock:
            paths, _ = self._paths()
            key = paths.pop(where, None)
            if key is None:
                self._files.remove_checkpoint(path)
                return
            newest = self._client.restore(path=("newest",))
            delta: dict[str, Any] = {"saves": {key: DELETE}, "paths": {where: DELETE}}
            if newest == key:
                left = sorted(set(paths.values()))
                delta["newest"] = left[-1] if left else DELETE
            self._client.update(delta, wait=self.wait)

    def teardown(self) -> None:
        self._client.close()

    def __enter__(self) -> AutosavedCheckpointIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()


class AutosavedCallback(pl.Callback):
    """Save the full training state every ``every_n_train_steps`` optimizer steps, through the trainer's
    checkpoint IO (so each save is acknowledged at the ``AutosavedCheckpointIO``'s ``wait``), under
    ``autosaved://<job>`` — the path ``fit(ckpt_path=...)`` resumes from."""

    def __init__(self, job: str, *, every_n_train_steps: int = 1) -> None:
        if not isinstance(every_n_train_steps, int) or every_n_train_steps < 1:
            raise ValueError(f"every_n_train_steps must be a positive int, not {every_n_train_steps!r}")
        self.job = job
        self.every_n_train_steps = every_n_train_steps
        self._last = -1

    @property
    def state_key(self) -> str:
        return f"AutosavedCallback[{self.job}]"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last or step % self.every_n_train_steps:
            return  # gradient accumulation: no optimizer step since the last save
        self._last = step
        trainer.save_checkpoint(f"{SCHEME}{self.job}", weights_only=False)
