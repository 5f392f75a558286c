"""When the daemon runs CPython's cyclic garbage collector over everything it holds (issue 19).

The daemon holds every loaded job's state as Python containers: a user with 64 MiB of counted state of
20,000-key maps is millions of them. CPython's automatic full (generation 2) collection walks every
tracked container each time, whichever thread triggers it, with the GIL held throughout: measured with
``scripts/hostile_user.py --roles shapes`` (40 s, 2 cores), 10 full collections took 2.26 s, up to 392 ms
each, and the well-behaved user's tail under attack was those pauses (max 356 ms). State trees are acyclic
(built fresh by the decoder, merged by replacing subtrees) and freed by reference counting; what only the
cyclic collector frees is the daemon's own short-lived cycles (tasks, exceptions and their tracebacks),
which die young and the young generations (0 and 1, still automatic and cheap) collect.

So automatic full collections are off, and a full collection runs on the event loop every
:data:`FULL_EVERY_S` seconds instead: one pause of O(what the daemon holds) per period rather than one every
few seconds under a stream of big updates; cyclic garbage that outlived the young generations waits for it
(bounded by what the daemon makes in a period).
"""

from __future__ import annotations

import gc

import anyio

# A full collection's period: long enough that its pause (hundreds of ms over a heap of millions of
# containers) is rare for any user's tail, short enough that cycles that outlived the young generations
# do not pile up.
FULL_EVERY_S = 300.0
# Generation 2's automatic threshold: never reached (CPython counts generation-1 collections against it).
NEVER = 2**31 - 1


def install() -> None:
    """Automatic collection of the young generations only (their thresholds unchanged)."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, NEVER)


async def full_collections(every: float = FULL_EVERY_S) -> None:
    """Collect every generation once per ``every`` seconds, on the event loop (a supervised task)."""
    while True:
        await anyio.sleep(every)
        gc.collect()
