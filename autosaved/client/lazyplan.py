"""Where and when a lazy update's copy runs: pure functions of the process's cores and the caller's cadence.

Issue 21: on the 2-core host a GPT-2-small trainer runs PyTorch's two intra-op (OpenMP) threads on both
cores, and a lazy step cost 1.1-1.4 CPU-s more than no checkpoint against 0.27-0.44 CPU-s for an eager
copy of the same bytes. A copy overlapped with threads that fill every core can only take a core from one
of them (the others then wait at the op's barrier) and compete with the step for memory bandwidth, so a
copy overlaps the trainer only where a core is left over for it; otherwise it waits for the fence (the
point before the state next changes: the next ``optimizer.step()``, ``update()``, ``wait()``) and runs
there with every core, as an eager update's copy does. A fence wait of twice the last step ran out on a host
whose steps swing 2-3x, handing the whole copy to the background beside the step (issue 21): the wait is
now several steps. (The lazy step that measured slower than eager's with the copy at the fence was the
benchmark's: it measured lazy one training step later, on a model whose steps grew as denormal floats
appeared; README, issue 21.)
"""

from __future__ import annotations

from typing import Final, Literal

CopyAt = Literal["overlap", "fence"]

# A copy left for the fence waits this long for one when the caller's cadence is not known yet (its first
# update): an update that nobody fences (the last one before exit, a caller that only ever calls update())
# is still copied and sent, in the background, after at most this long. Generous: a first step on fresh
# memory on a loaded 2-core host took 17 s (issue 21), and a copy that starts in the background while the
# caller still computes is the costly overlap the fence is there to avoid.
FIRST_WAIT: Final = 60.0
# Later: this many times the caller's last update-to-fence time (the fence is expected about one step
# later), within these bounds. Twice was too tight: on a shared host one step's forward and backward often
# took more than twice the previous one's (1.2 s, then 2.3 s; 4.7 s, then 9.1 s), and a fence that came
# a moment after its wait ran out found the copy running beside its step (issue 21). A caller that fences
# right after an update (a wait(), save(), a benchmark's hand-over alone) teaches a gap of ~0: the floor
# keeps its next step from counting as unfenced.
GAP_FACTOR: Final = 8.0
MIN_WAIT: Final = 10.0
MAX_WAIT: Final = 120.0


def copy_at(cores: int, compute_threads: int, busy_threads: int = 0) -> CopyAt:
    """``"overlap"`` (copy in the background now) when a core is left over beside the caller's compute
    threads (PyTorch's intra-op threads, or the caller alone) and other busy threads of the process;
    ``"fence"`` (copy when the caller fences, with every core) when none is."""
    spare = cores - max(1, compute_threads) - max(0, busy_threads)
    return "overlap" if spare >= 1 else "fence"


def fence_wait(last_gap: float | None) -> float:
    """How long a copy left for the fence waits for it before it is copied in the background anyway, given
    the seconds from the caller's previous update to its fence (``None``: not known)."""
    if last_gap is None:
        return FIRST_WAIT
    return min(MAX_WAIT, max(MIN_WAIT, GAP_FACTOR * last_gap))
