"""Which versions to keep: a pure function of the versions' ids and times, unit-tested without files.

Keep the newest ``keep_last`` versions, plus, with ``keep_every``, the newest version of every period of
that length (e.g. one per hour for ``keep_every = "1h"``), plus everything in ``protect`` (the version
just committed, the newest one that verifies). Everything else may go.
"""

from __future__ import annotations

from collections.abc import Sequence


def versions_to_delete(versions: Sequence[tuple[int, float | None]], *, keep_last: int, keep_every: float | None,
                       protect: frozenset[int] = frozenset()) -> list[int]:
    """``versions`` is (id, unix time or None when unknown), any order. Returns the ids to delete, ascending.

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
    return [vid for vid, _ in ordered if vid not in keep]
