"""Per owner, the names of the jobs ``quota.max_jobs`` counts, kept up to date instead of listed per request
(issue 19: creating a job costs O(1), whatever any user holds).

A job counts when its folder is on disk or it is loaded (created, not yet saved): the same set the daemon
listed before. An owner's set is established once, on the first check that needs it, from one listing of
that owner's folder (O(their jobs), in a worker thread) plus the jobs of theirs that are loaded; from then
on the job table adds a name when it takes a job in and forgets it when the job's folder is gone. A job
folder only comes into being for a job the table holds, so the set stays exact without another listing.
Changes that happen while the listing runs are replayed onto it, in order.

A job being created counts from the moment its quota check passes: the check and the table taking the
job in are separated by awaits (the job's folder is read in a thread, a bucket may seed it), and two
first updates of different new names by one user both passed a check with one slot left (issue 19).
``creating`` holds the name in the count over that gap.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import anyio
import anyio.to_thread


class JobNames:
    def __init__(self, listed: Callable[[int], set[str]], loaded: Callable[[int], Iterable[str]]) -> None:
        self._listed = listed  # the job folders of one owner (reads the disk: runs in a thread)
        self._loaded = loaded  # the names of one owner's loaded jobs (O(theirs), on the loop)
        self._names: dict[int, set[str]] = {}
        # Owners whose listing runs now: the adds (True) and forgets (False) seen meanwhile, in order.
        self._pending: dict[int, list[tuple[str, bool]]] = {}
        self._locks: dict[int, anyio.Lock] = {}
        self.listings = 0  # owner folders listed so far (one per owner per daemon run): tests read it
        # Per owner, the names of jobs a request is creating now (passed the quota check, not yet taken in),
        # with how many requests create each (a few: they are requests in flight, quota.max_requests).
        self._creating: dict[int, Counter[str]] = {}

    def used(self, owner: int, names: set[str], name: str) -> int | None:
        """How many jobs ``owner`` has, counting those being created; None when ``name`` is already one of
        them (creating it again takes no slot). O(the owner's creates in flight)."""
        creating = self._creating.get(owner, Counter())
        if name in names or name in creating:
            return None
        return len(names) + sum(1 for n in creating if n not in names)

    @contextlib.contextmanager
    def creating(self, owner: int, name: str) -> Iterator[None]:
        """Count ``name`` for ``owner`` while a request creates it (see the module's docstring)."""
        mine = self._creating.setdefault(owner, Counter())
        mine[name] += 1
        try:
            yield
        finally:
            mine[name] -= 1
            if not mine[name]:
                del mine[name]
            if not mine:
                del self._creating[owner]

    def surely_absent(self, owner: int, name: str) -> bool:
        """Whether ``owner`` certainly has no job ``name``: their set is established (a listing has run) and
        neither holds nor is creating it. O(1); False whenever it cannot tell without the disk."""
        names = self._names.get(owner)
        return names is not None and name not in names and name not in self._creating.get(owner, ())

    def add(self, owner: int, name: str) -> None:
        self._note(owner, name, True)

    def forget(self, owner: int, name: str) -> None:
        self._note(owner, name, False)

    def _note(self, owner: int, name: str, present: bool) -> None:
        names = self._names.get(owner)
        if names is not None:
            if present:
                names.add(name)
            else:
                names.discard(name)
        elif owner in self._pending:
            self._pending[owner].append((name, present))
        # Otherwise nobody has asked about this owner yet: the listing, when it comes, sees the disk.

    async def of(self, owner: int) -> set[str]:
        """The owner's job names (do not change the set: it is the live one)."""
        names = self._names.get(owner)
        if names is not None:
            return names
        async with self._locks.setdefault(owner, anyio.Lock()):
            names = self._names.get(owner)
            if names is not None:
                return names
            self._pending[owner] = []
            try:
                names = await anyio.to_thread.run_sync(self._listed, owner)
                self.listings += 1
                for name, present in self._pending[owner]:
                    if present:
                        names.add(name)
                    else:
                        names.discard(name)
                names.update(self._loaded(owner))
                self._names[owner] = names
            finally:
                del self._pending[owner]
        self._locks.pop(owner, None)
        return names
