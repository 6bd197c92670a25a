"""Pyro NUTS/HMC on the potential form ``U(w)``, started at ``w*``.

The potential form (``NUTS(potential_fn=...)``, THEORY §1.5) is exact and avoids
re-tracing the Pyro model at every gradient. Chains run one after another in this
process, each from ``w*`` with its own seed stream; the user's global RNG state is
left untouched.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from pyro.infer.mcmc import HMC, NUTS
from tqdm.auto import tqdm

from .._errors import SamplerWarning, warn
from .base import chain_seeds

if TYPE_CHECKING:  # pragma: no cover
    from ..posterior import LocalPosterior

__all__ = ["run_pyro_mcmc", "chain_seeds"]


def run_pyro_mcmc(
    post: LocalPosterior,
    *,
    method: str = "nuts",
    chains: int = 4,
    warmup: int = 1000,
    draws: int = 1000,
    seed: int = 0,
    progress: bool = True,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    step_size: float | None = None,
    num_steps: int | None = None,
    init_jitter: float = 0.0,
    adapt_step_size: bool = True,
    adapt_mass_matrix: bool = True,
    num_threads: int | None = None,
):
    from ..reference import ReferenceClass

    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1); got {target_accept}")
    if warmup < 50:
        warn(
            f"warmup={warmup} is very short: step-size and mass-matrix adaptation need a few "
            f"hundred steps, and with ~20 warmup steps NUTS can return all draws divergent.",
            SamplerWarning,
        )
    counter = {"grads": 0}

    def potential_fn(z):
        counter["grads"] += 1
        return post.potential(z["w"])

    kw = dict(
        potential_fn=potential_fn,
        target_accept_prob=target_accept,
        adapt_step_size=bool(adapt_step_size),
        adapt_mass_matrix=bool(adapt_mass_matrix),
        full_mass=bool(dense_mass),
    )
    if step_size is not None:
        kw["step_size"] = float(step_size)

    def make_kernel():
        if method == "nuts":
            return NUTS(max_tree_depth=int(max_tree_depth), **kw)
        return HMC(num_steps=int(num_steps or 16), **kw)

    seeds = chain_seeds(seed, chains)
    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        # small networks on CPU: one intra-op thread is often several times faster
        torch.set_num_threads(int(num_threads))
    t0 = time.perf_counter()
    try:
        out, diverging, step_sizes, accept = _run_chains(
            post, make_kernel, method, warmup, draws, seeds, progress, init_jitter
        )
    finally:
        torch.set_num_threads(prev_threads)
    wall = time.perf_counter() - t0
    ndiv = int(diverging.sum())
    if ndiv:
        per_chain = diverging.sum(1).tolist()
        warn(
            f"{ndiv} divergent transition(s) after warmup (per chain: {per_chain}). The draws are "
            f"kept and flagged (ReferenceClass.diverging), but estimates may be biased. Raise "
            f"target_accept (e.g. 0.95), lengthen warmup, loosen very tight tolerances, or "
            f"increase localization.",
            SamplerWarning,
        )
    info = {
        "diverging": diverging,
        "step_size": step_sizes,
        "accept_prob": accept,
    }
    settings = {
        "method": method,
        "backend": "pyro",
        "chains": chains,
        "warmup": warmup,
        "draws": draws,
        "seed": seed,
        "chain_seeds": seeds,
        "target_accept": target_accept,
        "max_tree_depth": max_tree_depth,
        "dense_mass": bool(dense_mass),
        "num_steps": num_steps,
        "init_jitter": init_jitter,
        "num_threads": num_threads,
        "wall_time_s": wall,
        "gradient_evaluations": counter["grads"],
    }
    return ReferenceClass.from_draws(post, out, settings=settings, sample_stats=info)


def _run_chains(post, make_kernel, method, warmup, draws, seeds, progress, init_jitter):
    """Run one kernel per seed from w*; returns draws, divergence flags, step sizes, accept."""
    chains = len(seeds)
    out = torch.empty(chains, draws, post.d, dtype=post.dtype, device=post.device)
    diverging = np.zeros((chains, draws), dtype=bool)
    step_sizes = np.zeros(chains)
    accept = np.zeros(chains)
    for c in range(chains):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeds[c])
            kernel = make_kernel()
            w0 = post.center.clone()
            if init_jitter > 0:
                w0 = w0 + init_jitter * torch.randn_like(w0)
            kernel.initial_params = {"w": w0}
            kernel.setup(warmup)
            params = kernel.initial_params
            bar = tqdm(
                total=warmup + draws,
                desc=f"{method.upper()} chain {c + 1}/{chains}",
                disable=not progress,
                leave=False,
                dynamic_ncols=True,
            )
            try:
                for i in range(warmup + draws):
                    params = kernel.sample(params)
                    if i >= warmup:
                        out[c, i - warmup] = params["w"].detach()
                    if progress and (i % 10 == 0 or i == warmup + draws - 1):
                        bar.set_postfix(
                            step=f"{kernel.step_size:.2e}",
                            acc=f"{kernel._mean_accept_prob:.2f}",
                            div=len(kernel._divergences),
                            refresh=False,
                        )
                    bar.update(1)
            finally:
                bar.close()
            div = [i for i in kernel._divergences if 0 <= i < draws]
            diverging[c, div] = True
            step_sizes[c] = float(kernel.step_size)
            accept[c] = float(kernel._mean_accept_prob)
            kernel.cleanup()
    return out, diverging, step_sizes, accept
