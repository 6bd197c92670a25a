"""The generic driver for torch kernels written to the sampler contract.

A kernel (after BlackJAX's ``SamplingAlgorithm``) is an object with

* ``init(position [C, d], key) -> State`` and
* ``step(key, state, batch=None) -> (State, Info)``,

``State`` and ``Info`` NamedTuples, ``State.w`` the ``[C, d]`` positions of all chains
at once. ``Info`` may carry ``accept_prob``, ``diverging`` and ``potential`` ``[C]``.
A kernel that adapts during warmup has a ``freeze(state) -> State`` the driver calls
when warmup ends. ``key`` is an integer: the kernel draws its noise from a generator
seeded with it, so a step is a pure function of ``(key, state)``.

``run_kernel`` runs ``warmup + draws·thin`` steps from ``w*`` (plus ``init_jitter``),
shows progress, keeps the draws, stops at the first non-finite position (keeping the
draws before it as a fault) and returns a ``SampleResult``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from .base import SampleResult, chain_seeds

if TYPE_CHECKING:  # pragma: no cover
    from ..posterior import LocalPosterior

__all__ = ["run_kernel", "step_key"]


def step_key(seed: int, t: int) -> int:
    """The key of step ``t`` of a run seeded with ``seed`` (SeedSequence, 63 bits)."""
    ss = np.random.SeedSequence([int(seed), int(t)])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def run_kernel(
    post: LocalPosterior,
    make,
    *,
    method: str,
    chains: int,
    warmup: int,
    draws: int,
    seed: int,
    progress: bool,
    thin: int = 1,
    init_jitter: float = 0.0,
    **options,
) -> SampleResult:
    """Run the kernel ``make(post, **options)`` (see the module doc)."""
    if int(thin) != thin or thin < 1:
        raise ValueError(f"thin must be an integer ≥ 1; got {thin!r}")
    if not init_jitter >= 0:
        raise ValueError(f"init_jitter must be ≥ 0; got {init_jitter!r}")
    kernel = make(post, **options)
    C, d = chains, post.d
    base = chain_seeds(seed, 1)[0]
    w0 = post.center.detach().clone().expand(C, d).clone()
    if init_jitter > 0:
        g = torch.Generator(device="cpu").manual_seed(step_key(base, -1))
        w0 = w0 + init_jitter * torch.randn(C, d, generator=g, dtype=w0.dtype).to(w0.device)
    state = kernel.init(w0, step_key(base, 0))
    total = warmup + draws * thin
    out = np.empty((C, draws, d), dtype=torch.empty((), dtype=post.dtype).numpy().dtype)
    info_keep: dict[str, np.ndarray] = {}
    fault, kept = None, 0
    bar = tqdm(total=total, desc=f"{method} · {C} chains", disable=not progress, leave=False)
    t0 = time.perf_counter()
    try:
        for t in range(total):
            if t == warmup and hasattr(kernel, "freeze"):
                state = kernel.freeze(state)
            state, info = kernel.step(step_key(base, t + 1), state)
            if not bool(torch.isfinite(state.w).all()):
                bad = (~torch.isfinite(state.w).all(-1)).nonzero().flatten().tolist()
                fault = (
                    f"{method}: chain(s) {bad[:8]} reached non-finite weights at step {t}; "
                    f"lower step_size or raise target_accept."
                )
                break
            if t >= warmup and (t - warmup) % thin == 0:
                s = (t - warmup) // thin
                out[:, s] = state.w.detach().cpu().numpy()
                for k, v in info._asdict().items():
                    if isinstance(v, torch.Tensor) and v.shape == (C,):
                        if k not in info_keep:
                            info_keep[k] = np.zeros((C, draws), dtype=v.cpu().numpy().dtype)
                        info_keep[k][:, s] = v.detach().cpu().numpy()
                kept = s + 1
            if progress and t % 20 == 0:
                acc = getattr(info, "accept_prob", None)
                if acc is not None:
                    bar.set_postfix(acc=f"{float(acc.float().mean()):.2f}", refresh=False)
            bar.update(1)
    finally:
        bar.close()
    if fault is not None and kept == 0:
        raise FloatingPointError(fault + " No draw was completed before it.")
    stats = {f"sampler/{k}": v[:, :kept] for k, v in info_keep.items()}
    if "sampler/diverging" in stats:
        stats["sampler/diverging"] = stats["sampler/diverging"].astype(bool)
    settings = {
        "method": method,
        "backend": "torch",
        "chains": C,
        "warmup": warmup,
        "draws": kept,
        "thin": int(thin),
        "seed": int(seed),
        "init_jitter": float(init_jitter),
        **{k: v for k, v in getattr(kernel, "settings", {}).items()},
        "wall_time_s": time.perf_counter() - t0,
    }
    if fault is not None:
        settings["draws_requested"] = draws
    return SampleResult(draws=out[:, :kept], stats=stats, settings=settings, fault=fault)
