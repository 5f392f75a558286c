"""The disk's write speed, remembered per disk across restarts (issue 22: five starts of a daemon with
``dirty_bytes = "auto"`` probed 146 to 1,143 MiB/s, so the derived limit ranged from 1.9 to 15 GB).

A first start probes several times and keeps the median; the figure is stored in the state dir keyed by
the state dir's device, and later starts begin from it instead of probing again. Real saves refine it
(the writer's smoothed speed), and each refinement is stored, so the estimate follows the disk slowly
rather than jumping with one probe. What is pure (choosing the figure) is apart from the file's I/O.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from ..storage.fsutil import fsync_dir, temp_name

log = logging.getLogger("autosaved.throttle")

MEMO_NAME = "write_speed.json"
# A stored figure is rewritten only when it moved this much: one small file, not a write per save.
REWRITE_SHARE = 0.05


def disk_key(directory: Path) -> str:
    """The device the state dir lives on (``major:minor``): the figure belongs to that disk."""
    st = os.stat(directory)
    return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def combine(samples: Sequence[float]) -> float:
    """One figure from several probe samples: the median, so one stalled or cached sample cannot move it."""
    if not samples:
        raise ValueError("no samples")
    return float(statistics.median(samples))


def worth_storing(stored: float | None, current: float) -> bool:
    return stored is None or abs(current - stored) > REWRITE_SHARE * stored


class SpeedMemo:
    """``<state dir>/write_speed.json``: ``{"<major:minor>": {"bytes_per_s": ..., "updated": ...}}``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / MEMO_NAME
        self.key = disk_key(state_dir)

    def _read_all(self) -> dict[str, dict[str, object]]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); probing the disk again", self.path, exc)
            return {}
        return doc if isinstance(doc, dict) else {}

    def load(self) -> float | None:
        entry = self._read_all().get(self.key)
        speed = entry.get("bytes_per_s") if isinstance(entry, dict) else None
        return float(speed) if isinstance(speed, int | float) and speed > 0 else None

    def store(self, speed: float, source: str) -> None:
        doc = self._read_all()
        doc[self.key] = {"bytes_per_s": round(speed), "source": source,
                         "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        tmp = temp_name(self.path.parent, "write-speed")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)
