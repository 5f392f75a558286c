"""How long to wait before retry ``n``: exponential, capped, with jitter.

A fixed schedule makes every host that failed together (one bucket's outage, one full disk) retry together,
in step, for ever; each retry then meets the same crowd. Here each wait is drawn uniformly from the upper
half of its exponential step ("equal jitter"): it still grows (never under half the step, so a broken store
is not hammered) and hosts drift apart after one or two retries. The random source is a parameter, so the
schedule is a pure function of (attempt, rng) and tests pin it with a seeded ``random.Random``.
"""

from __future__ import annotations

import random

_RNG = random.Random()


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (0 for the first retry): uniform in
    ``[step / 2, step]`` where ``step = min(cap, base * 2**attempt)``."""
    if attempt < 0 or base <= 0 or cap < base:
        raise ValueError(f"backoff: bad attempt={attempt} base={base} cap={cap}")
    step = cap if attempt >= 64 else min(cap, base * 2.0 ** attempt)
    return step / 2 + (rng or _RNG).random() * step / 2
