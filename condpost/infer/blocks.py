"""The driver of the JAX executors: compiled blocks of steps, warmup, progress.

The JAX samplers (NumPyro's NUTS/HMC, ChEES) run their chains inside one compiled
program of ``block`` steps at a time (``jax.lax.fori_loop`` / ``scan``), which is what
makes them fast: the host sees the chains only between blocks. ``run_blocks`` is the
host side, shared by both:

* it calls ``advance(state, i0, n) -> (state, bufs)`` for the blocks covering
  ``total = warmup + draws`` steps (``bufs``: host arrays ``[n, chains, ...]`` of the
  ``n`` steps from step ``i0``, padding already dropped);
* it splits each block at the end of warmup: the warmup part goes to ``on_warmup(bufs)``
  (divergence and gradient counts), the kept part to ``on_draws(s0, bufs)`` with the
  index ``s0`` of its first draw;
* it shows a tqdm bar updated after each block (``postfix(bufs)`` gives its fields;
  ``progress=False`` silences it) and times the run.

The torch kernels have their own driver (``condpost.infer.driver``): a step there is a
host call, and the windows, store and resume live on the host too.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tqdm.auto import tqdm

__all__ = ["run_blocks"]


def run_blocks(
    advance: Callable,
    state,
    *,
    total: int,
    warmup: int,
    block: int,
    on_warmup: Callable,
    on_draws: Callable,
    progress: bool,
    desc: str,
    postfix: Callable | None = None,
):
    """Run ``total`` steps in blocks of ``block``; returns ``(state, seconds)``."""
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for i0 in range(0, total, block):
            n = min(block, total - i0)
            state, bufs = advance(state, i0, n)
            n_warm = max(0, min(warmup - i0, n))
            if n_warm:
                on_warmup({k: v[:n_warm] for k, v in bufs.items()})
            if n > n_warm:
                on_draws(i0 + n_warm - warmup, {k: v[n_warm:n] for k, v in bufs.items()})
            if progress:
                if postfix is not None:
                    bar.set_postfix(postfix({k: v[n - 1] for k, v in bufs.items()}), refresh=False)
                bar.update(n)
    finally:
        bar.close()
    return state, time.perf_counter() - t0
