"""The daemon's counters of held state, kept up to date by every change instead of recomputed by a walk
(issue 19: per-request work is O(the request), whatever the daemon holds).

- ``state_bytes[owner]``: what ``quota.max_bytes`` counts, the cost (:func:`autosaved.state.measure`) of
  the current state of every job of the owner that the daemon holds;
- ``held_bytes``: bytes of binary leaves in daemon memory, all jobs together (``held_by_owner``: per owner,
  for a per-user memory budget);
- ``cache_bytes[owner]``: the owner's share of the state cache (statecache.py: the estimated memory of
  its jobs' resident trees, all within ``memory_limit``; ``cache_total`` all owners');
- ``refs``: for every client shared-memory mapping, how many binary leaves something still reads from it:
  the jobs' current states, snapshots being saved, log records waiting for their sync, restores being
  sent. A client's slot is lent while its mapping has a count here (``SlotTable.held_of``).

A job's share changes with its root: when the table takes the job in (:meth:`Ledger.attach`), when an
update is merged (:meth:`Ledger.apply`, from the :class:`~autosaved.state.Merged` of exactly the paths
the merge touched) and when it leaves the table (:meth:`Ledger.detach`, on delete). Everything else that
reads slot bytes for a while takes a :class:`Hold` and gives it back when done.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..state import Merged, Node, Refs, measure

log = logging.getLogger("autosaved.daemon")


@dataclass
class Hold:
    """Slot references taken by a snapshot, a log record or a restore; :meth:`release` gives them back
    (once, however often it is called)."""

    ledger: Ledger | None
    refs: Refs | None

    def release(self) -> None:
        if self.ledger is not None:
            self.ledger.add_refs(self.refs, -1)
            self.ledger = None


@dataclass
class Ledger:
    state_bytes: dict[int, int] = field(default_factory=dict)
    state_total: int = 0  # the sum of state_bytes, for status (O(1), not O(owners))
    held_bytes: int = 0
    held_by_owner: dict[int, int] = field(default_factory=dict)
    refs: Refs = field(default_factory=dict)
    cache_bytes: dict[int, int] = field(default_factory=dict)
    cache_total: int = 0

    def attach(self, owner: int, root: Node) -> None:
        self._charge(owner, root.cost, root.held)
        self.add_refs(root.refs)

    def detach(self, owner: int, root: Node) -> None:
        self._charge(owner, -root.cost, -root.held)
        self.add_refs(root.refs, -1)

    def apply(self, owner: int, merged: Merged) -> None:
        self._charge(owner, merged.cost, merged.held)
        self.add_refs(merged.added_refs)
        self.add_refs(merged.removed_refs, -1)

    def used(self, owner: int) -> int:
        """What ``quota.max_bytes`` counts for ``owner`` now."""
        return self.state_bytes.get(owner, 0)

    def held_of(self, owner: int) -> int:
        """Bytes of binary leaves of ``owner``'s states in daemon memory."""
        return self.held_by_owner.get(owner, 0)

    def charge_cache(self, owner: int, change: int) -> None:
        left = self.cache_bytes.get(owner, 0) + change
        if left:
            self.cache_bytes[owner] = left
        else:
            self.cache_bytes.pop(owner, None)
        self.cache_total += change

    def cached_of(self, owner: int) -> int:
        """``owner``'s share of the state cache."""
        return self.cache_bytes.get(owner, 0)

    def hold(self, refs: Refs | None) -> Hold:
        self.add_refs(refs)
        return Hold(self if refs else None, refs)

    def hold_tree(self, tree: Any) -> Hold:
        """Hold what a tree reads: a counted one's totals at once; any other value is measured (a
        restore's list of subtrees: O(what it sends))."""
        return self.hold(measure(tree)[2])

    def add_refs(self, refs: Refs | None, sign: int = 1) -> None:
        if not refs:
            return
        for mapping, n in refs.items():
            left = self.refs.get(mapping, 0) + sign * n
            if left > 0:
                self.refs[mapping] = left
            else:
                if left < 0:  # a bug: say so, and go on (the test suite's recount would catch it first)
                    log.error("slot references of a mapping went negative (%d)", left)
                self.refs.pop(mapping, None)

    def _charge(self, owner: int, cost: int, held: int) -> None:
        for table, change in ((self.state_bytes, cost), (self.held_by_owner, held)):
            left = table.get(owner, 0) + change
            if left:
                table[owner] = left
            else:
                table.pop(owner, None)
        self.held_bytes += held
        self.state_total += cost
