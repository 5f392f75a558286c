"""Which versions to keep: a pure function of the versions' ids, times and scores, unit-tested without files.

Keep the newest ``keep_last`` versions, plus, with ``keep_every``, the newest version of every period of
that length (e.g. one per hour for ``keep_every = "1h"``), plus, with ``keep_best``, the ``count`` versions
with the best value of a number in their ``meta`` (``{"val_loss": 0.31}``: as Orbax's ``best_fn`` and the HF
Trainer's ``load_best_model_at_end`` keep the best checkpoint), plus everything in ``protect`` (the version
just committed, the newest one that verifies). Everything else may go.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..settings import KeepBest


def score(meta: Mapping[str, Any] | None, metric: str) -> float | None:
    """The version's value of ``metric``: a finite number, else ``None`` (such a version is never "best")."""
    value = (meta or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def best_versions(scores: Mapping[int, float | None], best: KeepBest) -> list[int]:
    """The ids of the ``best.count`` best-scored versions, ascending; on a tie the newer version wins."""
    scored = [(s if best.mode == "min" else -s, -vid, vid) for vid, s in scores.items() if s is not None]
    return sorted(vid for _, _, vid in sorted(scored)[:best.count])


def versions_to_delete(versions: Sequence[tuple[int, float | None]], *, keep_last: int, keep_every: float | None,
                       protect: frozenset[int] = frozenset(), keep_best: KeepBest | None = None,
                       scores: Mapping[int, float | None] | None = None) -> list[int]:
    """``versions`` is (id, unix time or None when unknown), any order; ``scores`` the ``keep_best``
    metric per id (a version missing from it has none). Returns the ids to delete, ascending.

    A version whose time is unknown (an unreadable manifest) is never chosen by ``keep_every`` but can
    still go once ``keep_last`` newer ones exist.
    """
    ordered = sorted(versions)
    keep = set(protect)
    keep.update(vid for vid, _ in ordered[-keep_last:] if keep_last > 0)
    if keep_every:
        newest_per_period: dict[int, int] = {}
        for vid, t in ordered:
            if t is not None:
                newest_per_period[int(t // keep_every)] = vid  # ascending ids: the last one wins
        keep.update(newest_per_period.values())
    if keep_best is not None:
        present = {vid for vid, _ in ordered}
        keep.update(best_versions({v: s for v, s in (scores or {}).items() if v in present}, keep_best))
    return [vid for vid, _ in ordered if vid not in keep]
