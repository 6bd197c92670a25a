"""Pick torch's intra-op thread count for a small model, and put the user's back after.

On a CPU shared with other work, torch's default of one thread per core can make each
gradient of a small network several times slower than one thread does (the threads
wait for each other). ``fastest_threads`` times a few evaluations of ``fn`` with one
thread and with torch's current setting, keeps the faster for the duration of the
``with`` block, and restores the user's setting afterwards.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

__all__ = ["fastest_threads"]


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm up (allocations, lazy init)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@contextlib.contextmanager
def fastest_threads(
    fn: Callable[[], object] | None,
    requested: int | None = None,
    *,
    device: torch.device | None = None,
    reps: int = 3,
    budget_s: float = 0.5,
) -> Iterator[int]:
    """Run the block with ``requested`` threads, or the fastest of 1 and the current count.

    ``fn`` is one representative unit of work (a gradient of the potential). The timing
    is skipped, and the current setting kept, on non-CPU devices, when torch already
    uses one thread, or when one evaluation takes longer than ``budget_s`` / (2·reps)
    (a large model, where threads pay off). Yields the thread count in force.
    """
    prev = torch.get_num_threads()
    chosen = prev
    try:
        if requested is not None:
            if int(requested) != requested or requested < 1:
                raise ValueError(f"num_threads must be a positive integer; got {requested!r}")
            chosen = int(requested)
        elif fn is not None and prev > 1 and (device is None or device.type == "cpu"):
            t_prev = _time(fn, 1)
            if t_prev * 2 * reps < budget_s:
                t_prev = min(t_prev, _time(fn, reps))
                torch.set_num_threads(1)
                t_one = _time(fn, reps)
                chosen = 1 if t_one < t_prev else prev
        torch.set_num_threads(chosen)
        yield chosen
    finally:
        torch.set_num_threads(prev)
