"""Pyro NUTS/HMC on the potential form ``U(w)``, started at ``w*``.

The potential form (``NUTS(potential_fn=...)``, docs/theory.md §1.5) is exact and avoids
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

from ..potential import Potential
from .base import SampleResult, chain_seeds

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
) -> SampleResult:
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1); got {target_accept}")
    counter = {"grads": 0}
    pot = Potential(post)

    def potential_fn(z):
        counter["grads"] += 1
        return pot.value(z["w"])

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
    t0 = time.perf_counter()
    out, diverging, step_sizes, accept, fault = _run_chains(
        post, make_kernel, method, warmup, draws, seeds, progress, init_jitter
    )
    wall = time.perf_counter() - t0
    info = {
        "sampler/diverging": diverging,
        "sampler/step_size": step_sizes,
        "sampler/accept_prob": accept,
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
        "wall_time_s": wall,
        "gradient_evaluations": counter["grads"],
    }
    if fault is not None:
        settings["draws_requested"] = draws
        settings["chains_requested"] = chains
        settings["chains"], settings["draws"] = int(out.shape[0]), int(out.shape[1])
    return SampleResult(draws=out, stats=info, settings=settings, fault=fault)


def _run_chains(post, make_kernel, method, warmup, draws, seeds, progress, init_jitter):
    """Run one kernel per seed from w*.

    Returns draws ``[C, S, d]``, divergence flags, step sizes, acceptance and a fault
    message (None when every chain finished). When a chain raises, the chains completed
    before it are returned whole; if it was the first, its draws before the fault are.
    """
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
            i = -1
            try:
                for i in range(warmup + draws):
                    params = kernel.sample(params)
                    if i >= warmup:
                        out[c, i - warmup] = params["w"].detach()
                    if progress and (i % 10 == 0 or i == warmup + draws - 1):
                        diag = kernel.diagnostics()
                        bar.set_postfix(
                            step=f"{kernel.step_size:.2e}",
                            acc=f"{diag['acceptance rate']:.2f}",
                            div=len(diag["divergences"]),
                            refresh=False,
                        )
                    bar.update(1)
            except (RuntimeError, ValueError, FloatingPointError) as e:
                fault = f"chain {c} stopped at iteration {i} ({type(e).__name__}: {e})"
                if c > 0:
                    keep_c, keep_s = c, draws
                elif i > warmup:
                    keep_c, keep_s = 1, i - warmup
                else:
                    raise
                return (
                    out[:keep_c, :keep_s],
                    diverging[:keep_c, :keep_s],
                    step_sizes[:keep_c],
                    accept[:keep_c],
                    fault,
                )
            finally:
                bar.close()
            # Pyro's public per-kernel diagnostics: divergent iterations (counted from the
            # first draw) and the mean acceptance probability over the draws
            diag = kernel.diagnostics()
            div = [i for i in diag["divergences"] if 0 <= i < draws]
            diverging[c, div] = True
            step_sizes[c] = float(kernel.step_size)
            accept[c] = float(diag["acceptance rate"])
            kernel.cleanup()
    return out, diverging, step_sizes, accept, None
