"""NumPyro NUTS/HMC on the potential exported to JAX (``condpost.export``).

SVI on the same export lives in ``condpost.infer.numpyro_svi``.

The declaration is the same ``LocalPosterior`` the Pyro backend uses; its potential

.. math::

    U(w) = n\\beta L_n(w) + \\tfrac{\\gamma}{2}\\|w-w^*\\|^2 + \\sum_c \\rho_c D_c(w)

is exported once to a pure, jittable JAX function of the flat lifted vector
(``condpost.export.to_jax``), and NumPyro's kernels run on it in potential form
(``NUTS(potential_fn=U)``, docs/theory.md §1.5), started at ``w*``.

The driver is a thin loop over NumPyro's kernel contract (``kernel.init`` →
``kernel.sample``): blocks of iterations run inside one compiled ``lax.fori_loop``,
compiled ahead of time (so compilation is timed separately), with a tqdm bar updated
between blocks. The draws do not depend on the block size or on ``progress``.

Chains: ``"vectorized"`` (``vmap`` on one device: all chains advance together, a NUTS
iteration costs the longest of the chains' trajectories), ``"parallel"`` (``pmap``, one
chain per device) or ``"sequential"`` (one after another, one compilation).
Each chain's PRNG key derives from the user seed exactly as the Pyro backend's
per-chain seeds (``chain_seeds``), so chain ``c`` depends only on ``(seed, c)``.

Precision: ``x64=None`` follows the declaration's dtype (float64 declarations run in
JAX's 64-bit mode, set with the ``jax.enable_x64`` context for this call only; nothing
global changes). float32 and float64 runs adapt different step sizes: they are different
computations with the same target.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from .base import SampleResult, chain_seeds
from .blocks import run_blocks

if TYPE_CHECKING:  # pragma: no cover
    from ..posterior import LocalPosterior

__all__ = ["run_numpyro_mcmc", "export_potential"]

_CHAIN_METHODS = ("vectorized", "parallel", "sequential")


def _import_jax():
    try:
        import jax
        import numpyro  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised without jax installed
        raise ImportError(
            "backend='numpyro' needs JAX and NumPyro: pip install condpost[jax] "
            f"(import failed: {e})"
        ) from e
    return jax


def _use_x64(post, x64) -> bool:
    if x64 is None:
        return post.dtype == torch.float64
    if not isinstance(x64, bool):
        raise TypeError(f"x64 must be True, False or None (follow the posterior); got {x64!r}")
    return x64


def export_potential(post: LocalPosterior, *, x64: bool | None = None):
    """Export ``post``'s potential to JAX (``condpost.export.to_jax``) in the right precision.

    Must be called, and the result used, inside ``jax.enable_x64(x64)``; the runners
    here do that. Returns the exported object (``.potential``, ``.loss``, ``.d``,
    ``.dtype``, ``.center``, ``.export_seconds``).
    """
    from ..export import to_jax

    use64 = _use_x64(post, x64)
    dtype = torch.float64 if use64 else torch.float32
    t0 = time.perf_counter()
    jp = to_jax(post, dtype=None if dtype == post.dtype else dtype)
    secs = getattr(jp, "export_seconds", None)
    if secs is None:  # pragma: no cover - older exporters
        secs = time.perf_counter() - t0
    return jp, float(secs)


# ---------------------------------------------------------------------------- caching
# Exports and compiled sampler programs are cached on the declaration itself (so they
# live exactly as long as it does), keyed by everything they depend on: precision, the
# constraint list, nβ, γ and the version counter of w*. Seeds enter only through the
# state, so runs that differ in seed (or draws) reuse one compilation.
_CACHE_ATTR = "_condpost_numpyro_cache"


def _post_key(post, use64: bool) -> tuple:
    c = post.center
    return (
        use64,
        tuple(id(b) for b in post.constraints),
        float(post.nbeta),
        float(post.localization),
        id(c),
        c._version,
    )


def jp_cache(post, use64: bool) -> dict:
    """The per-declaration cache of compiled programs for this precision."""
    store = post.__dict__.setdefault(_CACHE_ATTR, {})
    key = _post_key(post, use64)
    entry = store.get(key)
    if entry is None:
        store.clear()  # the declaration changed (or another precision): drop stale programs
        entry = store[key] = {}
    return entry


def cached_export(post, x64: bool | None = None):
    """The posterior's JAX export in its precision, cached on the declaration.

    Raises ``condpost.export.UnsupportedOpError`` (a ``NotImplementedError``) when the
    model uses an op the export does not lower; the driver then falls back to Pyro.
    """
    jax = _import_jax()
    use64 = _use_x64(post, x64)
    with jax.enable_x64(use64):
        return _cached_export(post, use64)[0]


def _cached_export(post, use64: bool):
    """``(jp, export_seconds, cached)``; export time is 0 for a cached export."""
    cache = jp_cache(post, use64)
    if "export" in cache:
        return cache["export"], 0.0, True
    import jax

    jp, secs = export_potential(post, x64=use64)
    # one jitted wrapper per export: NumPyro's (eager) kernel init then compiles U once,
    # instead of dispatching the exported graph op by op; inside the sampler it inlines
    cache["potential"] = jax.jit(jp.potential)
    cache["export"] = jp
    return jp, secs, False


def _make_kernel(
    potential,
    *,
    method,
    target_accept,
    max_tree_depth,
    dense_mass,
    step_size,
    num_steps,
    adapt_step_size,
    adapt_mass_matrix,
):
    from numpyro.infer import HMC, NUTS

    kw = dict(
        potential_fn=potential,
        target_accept_prob=target_accept,
        adapt_step_size=adapt_step_size,
        adapt_mass_matrix=adapt_mass_matrix,
        dense_mass=dense_mass,
    )
    if step_size is not None:
        kw["step_size"] = step_size
    if method == "nuts":
        return NUTS(max_tree_depth=max_tree_depth, **kw)
    return HMC(num_steps=num_steps, **kw)


# ---------------------------------------------------------------------------- MCMC
_FIELDS = ("diverging", "num_steps", "accept_prob", "step_size", "potential_energy", "energy")
_MEASURED = ("loss", "virial")


def _record(state):
    """Per-iteration statistics of an ``HMCState`` (any batch shape)."""
    return {
        "z": state.z,
        "diverging": state.diverging,
        "num_steps": state.num_steps,
        "accept_prob": state.accept_prob,
        "step_size": state.adapt_state.step_size,
        "potential_energy": state.potential_energy,
        "energy": state.energy,
    }


def _measure(loss_fn, center):
    """``state -> {"loss": L_n(z), "virial": (z − w*)·∇U(z)}`` for one chain or a batch.

    The kernel already holds ∇U at z (``z_grad``), so the virial term is free; ``L_n``
    costs one forward pass. The driver then re-evaluates nothing in torch.
    """
    import jax
    import jax.numpy as jnp

    def measure(state):
        z = state.z
        loss = jax.vmap(loss_fn)(z) if z.ndim == 2 else loss_fn(z)
        return {"loss": loss, "virial": jnp.sum((z - center) * state.z_grad, axis=-1)}

    return measure


def _make_block(sample, block: int, measure):
    """``(state, n) -> (state, buffers)``: ``n ≤ block`` kernel steps in one compiled loop."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    def record(st):
        return {**_record(st), **measure(st)}

    def run(state, n):
        proto = record(state)
        bufs = {k: jnp.zeros((block,) + v.shape, v.dtype) for k, v in proto.items()}

        def body(i, carry):
            st, bf = carry
            st = sample(st)
            rec = record(st)
            bf = {k: lax.dynamic_update_index_in_dim(bf[k], rec[k], i, 0) for k in bf}
            return st, bf

        return lax.fori_loop(0, n, body, (state, bufs))

    del jax
    return run


def run_numpyro_mcmc(
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
    chain_method: str | None = None,
    x64: bool | None = None,
    block_size: int | None = None,
):
    """NUTS or HMC with NumPyro on the exported potential; returns a ``ReferenceClass``.

    Parameters
    ----------
    post : LocalPosterior
        The declaration; its potential is exported with ``condpost.export.to_jax``.
    method : {"nuts", "hmc"}
        NUTS (Hoffman & Gelman 2014, multinomial variant as in NumPyro) or static HMC
        with ``num_steps`` leapfrog steps (default 16).
    chains, warmup, draws, seed, progress
        As for the Pyro backend. Every chain starts at ``w*`` (plus ``init_jitter``·N(0, I)).
    target_accept, max_tree_depth, dense_mass, step_size, adapt_step_size, adapt_mass_matrix
        NumPyro's ``target_accept_prob``, ``max_tree_depth``, ``dense_mass``, initial
        ``step_size`` (default 1.0, adapted) and adaptation switches.
    chain_method : {"vectorized", "parallel", "sequential"}, optional
        Default: ``"sequential"`` for one chain (no batch axis), ``"parallel"`` when there
        are at least ``chains`` JAX devices, else ``"vectorized"``.
    x64 : bool, optional
        Run in float64 (``True``) or float32 (``False``); default: the declaration's dtype.
    block_size : int, optional
        Iterations per compiled block between progress-bar updates (default 50). Does not
        change the draws.

    Returns
    -------
    ReferenceClass
        With ``sample_stats`` ``diverging``, ``num_steps`` (leapfrog steps = gradient
        evaluations), ``tree_depth``, ``accept_prob``, ``step_size``, ``energy`` per
        draw, and ``settings`` recording the backend, export and compile times and the
        number of gradient evaluations.
    """
    jax = _import_jax()
    import jax.numpy as jnp

    method = method.lower()
    if method not in ("nuts", "hmc"):
        raise ValueError(f"method must be 'nuts' or 'hmc' for backend='numpyro'; got {method!r}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1); got {target_accept}")
    for arg, v, lo in (("chains", chains, 1), ("draws", draws, 1), ("warmup", warmup, 0)):
        if int(v) != v or v < lo:
            raise ValueError(f"{arg} must be an integer ≥ {lo}; got {v!r}")
    chains, warmup, draws = int(chains), int(warmup), int(draws)
    if int(max_tree_depth) != max_tree_depth or max_tree_depth < 1:
        raise ValueError(f"max_tree_depth must be a positive integer; got {max_tree_depth!r}")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive; got {step_size!r}")
    if num_steps is not None and (int(num_steps) != num_steps or num_steps < 1):
        raise ValueError(f"num_steps must be a positive integer; got {num_steps!r}")
    if not init_jitter >= 0:
        raise ValueError(f"init_jitter must be ≥ 0; got {init_jitter!r}")
    ndev = len(jax.devices())
    if chain_method is None:
        if chains == 1:
            # no batch axis: vmapping NUTS over one chain turns the tree's conditionals into
            # selects (both branches computed), ~20% more work per gradient
            chain_method = "sequential"
        else:
            chain_method = "parallel" if ndev >= chains else "vectorized"
    if chain_method not in _CHAIN_METHODS:
        raise ValueError(
            f"chain_method must be one of {list(_CHAIN_METHODS)}; got {chain_method!r}"
        )
    if chain_method == "parallel" and ndev < chains:
        raise ValueError(
            f"chain_method='parallel' runs one chain per device and needs ≥ {chains} JAX "
            f"devices; found {ndev}. Use chain_method='vectorized' (one device), lower chains, "
            f"or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={chains} before "
            f"importing jax."
        )
    total = warmup + draws
    if block_size is None:
        block_size = 50  # fixed, so runs differing only in draws share one compilation
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer; got {block_size!r}")
    block_size = int(block_size)
    use64 = _use_x64(post, x64)
    seeds = chain_seeds(seed, chains)

    with jax.enable_x64(use64):
        jp, export_s, cached_export = _cached_export(post, use64)
        kernel_kw = dict(
            method=method,
            target_accept=float(target_accept),
            max_tree_depth=int(max_tree_depth),
            dense_mass=bool(dense_mass),
            step_size=None if step_size is None else float(step_size),
            num_steps=int(num_steps or 16) if method == "hmc" else None,
            adapt_step_size=bool(adapt_step_size),
            adapt_mass_matrix=bool(adapt_mass_matrix),
        )
        fdtype = jnp.float64 if use64 else jnp.float32
        center = jnp.asarray(post.center.detach().cpu().numpy(), dtype=fdtype)
        run_keys, jit_keys = [], []
        for s in seeds:
            a, b = jax.random.split(jax.random.PRNGKey(s))
            run_keys.append(a)
            jit_keys.append(b)
        run_keys = jnp.stack(run_keys)
        W0 = jnp.broadcast_to(center, (chains, post.d))
        if init_jitter > 0:
            noise = jnp.stack([jax.random.normal(k, (post.d,), fdtype) for k in jit_keys])
            W0 = W0 + float(init_jitter) * noise

        t0 = time.perf_counter()
        ckey = ("mcmc", tuple(sorted(kernel_kw.items())), chains, chain_method, warmup, block_size)
        hit = jp_cache(post, use64).get(ckey)
        if hit is None:
            kernel = _make_kernel(jp_cache(post, use64)["potential"], **kernel_kw)
        else:
            kernel, compiled, batch_axis = hit
        if chain_method == "vectorized":
            state = kernel.init(run_keys, warmup, init_params=W0)
            states = None
        else:
            states = [kernel.init(run_keys[c], warmup, init_params=W0[c]) for c in range(chains)]
            state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
        if hit is None:
            block = _make_block(
                lambda st: kernel.sample(st, (), {}), block_size, _measure(jp.loss, center)
            )
            if chain_method == "vectorized":
                compiled = jax.jit(block).lower(state, 0).compile()
                batch_axis = 1  # buffers [block, chains, ...]
            elif chain_method == "parallel":
                compiled = jax.pmap(block, in_axes=(0, None)).lower(state, 0).compile()
                batch_axis = 0  # buffers [chains, block, ...]
            else:
                compiled = jax.jit(block).lower(states[0], 0).compile()
                batch_axis = None  # one chain at a time, buffers [block, ...]
            jp_cache(post, use64)[ckey] = (kernel, compiled, batch_axis)
        compile_s = time.perf_counter() - t0

        out = np.empty((chains, draws, post.d), dtype=np.float64 if use64 else np.float32)
        stats = {k: np.zeros((chains, draws), dtype=np.float64) for k in _FIELDS + _MEASURED}
        stats["diverging"] = np.zeros((chains, draws), dtype=bool)
        stats["num_steps"] = np.zeros((chains, draws), dtype=np.int64)
        warm_grads = np.zeros(chains, dtype=np.int64)
        warm_div = np.zeros(chains, dtype=np.int64)

        def advance(st, i0, nb):
            st, bufs = compiled(st, nb)
            bufs = {k: np.asarray(v) for k, v in bufs.items()}
            if batch_axis == 0:  # [C, B, ...] -> [B, C, ...]
                bufs = {k: np.swapaxes(v, 0, 1) for k, v in bufs.items()}
            elif batch_axis is None:  # [B, ...] -> [B, 1, ...]
                bufs = {k: v[:, None] for k, v in bufs.items()}
            return st, bufs

        def run_chain_blocks(st, c_slice, desc):
            def on_warmup(b):
                warm_grads[c_slice] += b["num_steps"].sum(0)
                warm_div[c_slice] += b["diverging"].sum(0)

            def on_draws(s0, b):
                k = b["z"].shape[0]
                out[c_slice, s0 : s0 + k] = np.swapaxes(b["z"], 0, 1)
                for name in _FIELDS + _MEASURED:
                    stats[name][c_slice, s0 : s0 + k] = np.swapaxes(b[name], 0, 1)

            def postfix(last):
                return {
                    "step": f"{float(np.mean(last['step_size'])):.2e}",
                    "div": int(stats["diverging"][c_slice].sum()),
                }

            return run_blocks(
                advance,
                st,
                total=total,
                warmup=warmup,
                block=block_size,
                on_warmup=on_warmup,
                on_draws=on_draws,
                progress=progress,
                desc=desc,
                postfix=postfix,
            )[0]

        t1 = time.perf_counter()
        if batch_axis is None:
            for c in range(chains):
                run_chain_blocks(
                    states[c], slice(c, c + 1), f"{method.upper()} chain {c + 1}/{chains}"
                )
        else:
            run_chain_blocks(state, slice(0, chains), f"{method.upper()} {chains} chain(s)")
        run_s = time.perf_counter() - t1

    grads = int(warm_grads.sum() + stats["num_steps"].sum() + chains)  # + one at each init
    diverging = stats["diverging"]
    sample_stats = {
        "loss": stats["loss"],
        "virial": stats["virial"],
        "sampler/diverging": diverging,
        "sampler/num_steps": stats["num_steps"],
        "sampler/tree_depth": np.where(
            stats["num_steps"] > 0, np.floor(np.log2(np.maximum(stats["num_steps"], 1))) + 1, 0
        ).astype(np.int64),
        "sampler/accept_prob": stats["accept_prob"],
        "sampler/step_size": stats["step_size"],
        "sampler/potential_energy": stats["potential_energy"],
        "sampler/energy": stats["energy"],
    }
    settings = {
        "method": method,
        "backend": "numpyro",
        "chains": chains,
        "warmup": warmup,
        "draws": draws,
        "seed": int(seed),
        "chain_seeds": seeds,
        "chain_method": chain_method,
        "x64": use64,
        "target_accept": float(target_accept),
        "max_tree_depth": int(max_tree_depth),
        "dense_mass": bool(dense_mass),
        "step_size": step_size,
        "num_steps": num_steps,
        "init_jitter": float(init_jitter),
        "adapt_step_size": bool(adapt_step_size),
        "adapt_mass_matrix": bool(adapt_mass_matrix),
        "block_size": block_size,
        "export_time_s": export_s,
        "export_cached": cached_export,
        "compile_time_s": compile_s,
        "compile_cached": hit is not None,
        "run_time_s": run_s,
        "wall_time_s": compile_s + run_s,
        "gradient_evaluations": grads,
        "warmup_divergences": warm_div.tolist(),
        "jax_devices": [str(d) for d in jax.devices()],
        "versions": _jax_versions(),
    }
    if out.dtype != _np_dtype(post.dtype):
        out = out.astype(_np_dtype(post.dtype))
    return SampleResult(draws=out, stats=sample_stats, settings=settings)


def _np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


def _jax_versions() -> dict:
    import jax
    import numpyro

    return {"jax": jax.__version__, "numpyro": numpyro.__version__}
