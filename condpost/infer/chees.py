"""Many-chain HMC with ChEES adaptation, on the potential exported to JAX.

ChEES-HMC (Hoffman, Radul & Sountsov 2021, "An adaptive MCMC scheme for setting
trajectory lengths in Hamiltonian Monte Carlo", AISTATS) runs ``C`` chains in lockstep.
Every iteration all chains integrate the same number of leapfrog steps, so a GPU runs
them as one batched gradient per step, with no chain waiting for another's tree (as
vectorized NUTS does). The tuning parameters are shared and adapted from across-chain
statistics during warmup:

* **Jittered trajectory length.** Iteration ``i`` integrates for time ``t_i = u_i T``,
  i.e. ``L_i = ⌈u_i T / ε⌉`` leapfrog steps (capped at ``max_leapfrog``), the same for
  all chains. During warmup ``u_i`` is the base-2 van der Corput (Halton) sequence in
  (0, 1), as in the paper; after warmup it is i.i.d. uniform on (0, 1], shared by the
  chains. Either way the jitter never depends on the state, so every post-warmup
  transition leaves the target invariant. (With Halton jitter after warmup the chains
  are periodically inhomogeneous and ArviZ's ESS of quadratic statistics came out too
  optimistic: z-scores of ``E[nβΔL]`` on docs/theory.md §4.1 had SD 1.45 over 12 seeds, against
  0.95 with uniform jitter.)
* **Trajectory length by ChEES.** ``T`` ascends the ChEES criterion
  ``¼E[(‖θ'−E θ‖² − ‖θ−E θ‖²)²]`` (computed in the whitened coordinates
  ``z = θ/σ`` of the diagonal metric). Its per-chain gradient with respect to ``log T``
  is ``ĝ_c = t·(‖z'_c − z̄'‖² − ‖z_c − z̄‖²)·(z'_c − z̄')ᵀ v'_c``, ``v'`` the final
  whitened velocity ``σ⊙p'``; the chains' estimates are averaged with weights
  ``α_c`` (their acceptance probabilities) and ``log T`` takes an Adam step
  (Kingma & Ba 2015) without first moment (``β₁ = 0``, ``β₂ = 0.95``, rate 0.025, as in
  the paper and TFP's reference implementation). After warmup ``T`` is the iterate
  average ``log T̄``, weighted as in dual averaging.
* **Step size by dual averaging** (Nesterov 2009; Hoffman & Gelman 2014, Alg. 5:
  ``γ = 0.05, t₀ = 10, κ = 0.75, μ = log 10ε₀``) of the *harmonic mean* of the chains'
  acceptance probabilities towards ``target_accept`` (0.651 by default, the optimal HMC
  acceptance rate of Beskos et al. 2013). The harmonic mean is dominated by the
  worst chains, so no chain is left stuck.
* **Diagonal metric** ``M⁻¹ = diag(σ²)`` from the variance of the positions pooled
  over all chains and the iterations of each adaptation window (windows end at 10, 20,
  40 and 80% of warmup), regularised as in Stan (``n/(n+5)·σ̂² + 10⁻³·5/(n+5)``).
  When the metric changes, ``ε`` and ``T`` are rescaled by the geometric mean of
  ``σ_old/σ_new`` and dual averaging and Adam restart.

Divergences (energy error ``ΔH > 1000`` or non-finite, as in Stan and NumPyro) are
rejected, counted and flagged per draw; no draw is dropped.

Execution: the kernel follows condpost's sampler contract (after BlackJAX's
``SamplingAlgorithm``): ``kernel = make_kernel(fn, params)`` closes over the tuning
constants, ``kernel.init(position, key) → ChEESState`` and ``kernel.step(key, state,
batch=None) → (ChEESState, ChEESInfo)``, NamedTuples; the state carries the iteration
counter ``i`` and every adapted quantity, and the step draws its randomness from ``key``
alone. :func:`chees_sample` splits the seed's key into an initialisation key and a run
key and gives iteration ``i`` the key ``fold_in(run_key, i)``; blocks of
``block_size`` iterations are one compiled ``lax.scan`` (progress is shown between
blocks). Warmup and sampling are the same program (adaptation is switched off by
``state.i ≥ warmup``), so draw ``s`` depends on ``(seed, chains, warmup, settings)`` only:
not on the block size, on ``progress``, on the number of draws after it, or (beyond
float summation order) on the number of devices used for sharding. With several JAX devices the chain axis is
sharded over them (``jax.sharding``); across-chain means then become all-reduces.

Nested R-hat (Margossian et al. 2024) is computed on superchains: chains within a
superchain start at the same point ``w* + init_jitter·ξ_k``.

This module imports JAX only inside functions, so ``nested_rhat`` is usable without it.
"""

from __future__ import annotations

import math
import time
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .._errors import SamplerWarning, warn
from .base import SampleResult
from .blocks import run_blocks

if TYPE_CHECKING:  # pragma: no cover
    from ..posterior import LocalPosterior

__all__ = [
    "run_chees",
    "chees_sample",
    "ChEESParams",
    "make_params",
    "make_kernel",
    "iteration_key",
    "chees_init",
    "ChEESKernel",
    "ChEESState",
    "ChEESInfo",
    "nested_rhat",
    "default_superchains",
    "halton",
]

DIVERGENCE_THRESHOLD = 1000.0  # energy error counted as divergent (Stan, NumPyro)
_DA_GAMMA, _DA_T0, _DA_KAPPA = 0.05, 10.0, 0.75  # Hoffman & Gelman (2014), Alg. 5
_WINDOW_ENDS = (0.1, 0.2, 0.4, 0.8)  # metric updates, as fractions of warmup
_WINDOW_START = 0.05  # the first window skips the first 5% (transient from w*)


# ---------------------------------------------------------------------------- diagnostics
def default_superchains(chains: int) -> int:
    """Default number of superchains: groups of 4 chains when ``chains ≥ 8`` and divisible
    by 4, else one chain per superchain."""
    return chains // 4 if chains >= 8 and chains % 4 == 0 else chains


def nested_rhat(x, superchains: int) -> float | np.ndarray:
    """Nested R-hat (Margossian, Hoffman, Sountsov, Riou-Durand, Vehtari & Gelman 2024,
    "Nested R-hat: assessing the convergence of MCMC when running many short chains",
    Bayesian Analysis, doi:10.1214/24-BA1453).

    The ``C`` chains are split into ``K = superchains`` consecutive groups of
    ``M = C/K`` chains (chains ``k·M … (k+1)·M − 1`` form superchain ``k``; they should
    share an initial point). With ``N`` draws per chain, chain means ``f̄_{mk}``,
    superchain means ``f̄_k`` and the overall mean ``f̄``:

    .. math::

        \\hat B_\\nu = \\frac{1}{K-1}\\sum_k (\\bar f_k - \\bar f)^2,\\qquad
        \\hat W_\\nu = \\frac1K\\sum_k\\Big[\\underbrace{\\tfrac{1}{M-1}\\sum_m
        (\\bar f_{mk}-\\bar f_k)^2}_{0\\text{ if }M=1} + \\underbrace{\\tfrac1M\\sum_m
        \\tfrac{1}{N-1}\\sum_n (f_{nmk}-\\bar f_{mk})^2}_{0\\text{ if }N=1}\\Big],

    .. math::

        \\hat R_\\nu = \\sqrt{1 + \\hat B_\\nu/\\hat W_\\nu}\\;\\ge 1.

    It stays informative when each chain is short (even ``N = 1``), where split R-hat is
    not; values near 1 (e.g. below 1.01) mean the superchains agree, i.e. they have
    forgotten their starting points.

    Parameters
    ----------
    x : array [chains, draws, *event]
        Draws of one or several scalar quantities.
    superchains : int
        ``K ≥ 2``, dividing the number of chains.

    Returns
    -------
    float or array of shape ``event``
        NaN where ``Ŵ_ν = 0`` (constant draws) or a draw is non-finite.
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim < 2:
        raise ValueError(f"x must have shape [chains, draws, ...]; got shape {a.shape}")
    C, N = a.shape[:2]
    K = int(superchains) if int(superchains) == superchains else -1
    if K < 2 or C % K:
        raise ValueError(
            f"superchains must be an integer ≥ 2 that divides the number of chains ({C}); "
            f"got {superchains!r}"
        )
    M = C // K
    g = a.reshape((K, M, N) + a.shape[2:])
    chain_mean = g.mean(2)  # [K, M, ...]
    sc_mean = chain_mean.mean(1)  # [K, ...]
    b_nu = sc_mean.var(0, ddof=1)
    between_chain = chain_mean.var(1, ddof=1) if M > 1 else np.zeros_like(sc_mean)
    within_chain = g.var(2, ddof=1).mean(1) if N > 1 else np.zeros_like(sc_mean)
    w_nu = (between_chain + within_chain).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.sqrt(1.0 + b_nu / w_nu)
    r = np.where((w_nu > 0) & np.isfinite(a).all(axis=(0, 1)), r, np.nan)
    return float(r) if r.ndim == 0 else r


def halton(i):
    """Base-2 van der Corput (1-D Halton) value of the positive integer(s) ``i``, in (0, 1).

    ``halton(i) = Σ_k b_k(i) 2^{−k−1}`` with ``b_k(i)`` the k-th bit of ``i``: the bits
    reversed behind the binary point (1 → 0.5, 2 → 0.25, 3 → 0.75, …).
    """
    import jax.numpy as jnp

    i = jnp.asarray(i, jnp.uint32)
    k = jnp.arange(32, dtype=jnp.uint32)
    bits = (i[..., None] >> k) & jnp.uint32(1)
    w = jnp.exp2(-(k.astype(jnp.float32) + 1.0))
    return (bits.astype(jnp.float32) * w).sum(-1)


# ---------------------------------------------------------------------------- kernel
class ChEESParams(NamedTuple):
    """Tuning constants of a run. They enter the compiled program as traced values, so runs
    that differ only in these (or in the seed) reuse one compilation.

    ``warmup`` adaptation iterations; ``target_accept`` for the harmonic-mean acceptance;
    ``max_leapfrog`` cap on steps per iteration; ``learning_rate`` of Adam on ``log T``;
    ``adapt_step_size``, ``adapt_trajectory``; ``halton_warmup`` (Halton jitter during
    warmup, else uniform); ``window_starts``/``window_ends``
    ``[4]`` metric windows ``[start, end)`` in iterations (``-1``: no window).
    """

    warmup: Any
    target_accept: Any
    max_leapfrog: Any
    learning_rate: Any
    adapt_step_size: Any
    adapt_trajectory: Any
    halton_warmup: Any
    window_starts: Any
    window_ends: Any


def make_params(
    warmup: int,
    *,
    target_accept: float = 0.651,
    max_leapfrog: int = 1000,
    learning_rate: float = 0.025,
    adapt_step_size: bool = True,
    adapt_trajectory: bool = True,
    adapt_mass_matrix: bool = True,
    warmup_jitter: str = "halton",
    dtype=None,
) -> ChEESParams:
    """:class:`ChEESParams` as JAX arrays, with the metric windows of ``warmup``."""
    import jax.numpy as jnp

    starts, ends = _windows(warmup, adapt_mass_matrix)
    pad = lambda t: jnp.asarray(list(t) + [-1] * (len(_WINDOW_ENDS) - len(t)), jnp.int32)  # noqa: E731
    f = lambda v: jnp.asarray(v, dtype or jnp.float32)  # noqa: E731
    return ChEESParams(
        warmup=jnp.asarray(warmup, jnp.int32),
        target_accept=f(target_accept),
        max_leapfrog=jnp.asarray(max_leapfrog, jnp.int32),
        learning_rate=f(learning_rate),
        adapt_step_size=jnp.asarray(bool(adapt_step_size)),
        adapt_trajectory=jnp.asarray(bool(adapt_trajectory)),
        halton_warmup=jnp.asarray(warmup_jitter == "halton"),
        window_starts=pad(starts),
        window_ends=pad(ends),
    )


class ChEESState(NamedTuple):
    """State of the ensemble and of the adaptation (a pytree of JAX arrays).

    ``w`` ``[C, d]`` positions, ``u`` ``[C]`` potentials, ``g`` ``[C, d]`` gradients,
    ``aux`` the potential function's auxiliary output at ``w``; ``inv_mass`` ``[d]``
    (``σ²``); ``log_eps``/``log_eps_bar`` current and averaged log step size;
    ``log_t``/``log_t_bar`` current and averaged log trajectory length; ``da_h``,
    ``da_mu``, ``da_k`` dual-averaging statistic, shrinkage point and count; ``adam_v``,
    ``adam_k`` Adam's second moment and count; ``wf_n``, ``wf_mean``, ``wf_m2``
    Welford accumulators of the current metric window; ``i`` the number of iterations
    taken (``int32``): iteration ``i`` adapts while ``i < warmup``.
    """

    w: Any
    u: Any
    g: Any
    aux: Any
    inv_mass: Any
    log_eps: Any
    log_eps_bar: Any
    log_t: Any
    log_t_bar: Any
    da_h: Any
    da_mu: Any
    da_k: Any
    adam_v: Any
    adam_k: Any
    wf_n: Any
    wf_mean: Any
    wf_m2: Any
    i: Any


class ChEESInfo(NamedTuple):
    """What one iteration reports (a pytree of JAX arrays).

    Per chain ``[C]``: ``potential_energy``, ``accept_prob``, ``diverging``,
    ``energy_error`` and ``virial`` ``(w − w*)·∇U(w)`` (``None`` when the kernel was built
    without ``center``); ``w`` ``[C, d]`` and ``aux`` the state after the iteration. Shared
    by all chains (scalars): ``step_size``, ``num_steps`` (leapfrog steps = gradient
    evaluations per chain), ``trajectory_length`` and ``harmonic_accept``.
    """

    w: Any
    aux: Any
    potential_energy: Any
    accept_prob: Any
    diverging: Any
    energy_error: Any
    step_size: Any
    num_steps: Any
    trajectory_length: Any
    harmonic_accept: Any
    virial: Any


class ChEESKernel(NamedTuple):
    """The sampler contract (after BlackJAX's ``SamplingAlgorithm``), built by
    :func:`make_kernel`.

    ``init(position [C, d], key, log_eps0=0.0, log_t0=0.0, search_step_size=True,
    default_trajectory=True) -> ChEESState`` (see :func:`chees_init`) and
    ``step(key, state, batch=None) -> (ChEESState, ChEESInfo)``, one iteration of all
    chains.
    """

    init: Any
    step: Any


def _value_and_grad(fn):
    """Batched ``w [C, d] → ((U [C], aux), ∇U [C, d])`` of ``fn: w [d] → (U, aux)``."""
    import jax

    return jax.vmap(jax.value_and_grad(fn, has_aux=True))


def _unpack(out):
    (u, aux), g = out
    return u, g, aux


def _leapfrog(vg, w, p, u, g, aux, eps, inv_mass, n_steps):
    """``n_steps`` leapfrog steps of size ``eps`` for all chains (a traced trip count)."""
    from jax import lax

    def body(_, carry):
        w, p, u, g, aux = carry
        p = p - 0.5 * eps * g
        w = w + eps * inv_mass * p
        u, g, aux = _unpack(vg(w))
        p = p - 0.5 * eps * g
        return w, p, u, g, aux

    return lax.fori_loop(0, n_steps, body, (w, p, u, g, aux))


def _harmonic_mean(alpha):
    import jax.numpy as jnp

    return alpha.shape[0] / jnp.sum(1.0 / jnp.maximum(alpha, 1e-20))


def _step_size_search(vg, state: ChEESState, key, target: float = 0.5, max_iter: int = 60):
    """Initial step size (Hoffman & Gelman 2014, Alg. 4, on the ensemble): double or halve
    ``ε`` until the harmonic-mean acceptance of one leapfrog step crosses ``target``."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    sigma = jnp.sqrt(state.inv_mass)
    p0 = jax.random.normal(key, state.w.shape, state.w.dtype) / sigma
    h0 = state.u + 0.5 * jnp.sum(p0 * p0 * state.inv_mass, -1)

    def accept(log_eps):
        w, p, u, _, _ = _leapfrog(
            vg, state.w, p0, state.u, state.g, state.aux, jnp.exp(log_eps), state.inv_mass, 1
        )
        dh = u + 0.5 * jnp.sum(p * p * state.inv_mass, -1) - h0
        alpha = jnp.where(jnp.isfinite(dh), jnp.exp(jnp.minimum(0.0, -dh)), 0.0)
        return _harmonic_mean(alpha)

    a0 = accept(state.log_eps)
    direction = jnp.where(a0 > target, 1.0, -1.0).astype(state.log_eps.dtype)

    def cond(c):
        log_eps, acc, it = c
        return ((direction > 0) == (acc > target)) & (it < max_iter)

    def body(c):
        log_eps, _, it = c
        log_eps = log_eps + direction * jnp.log(2.0).astype(log_eps.dtype)
        return log_eps, accept(log_eps), it + 1

    log_eps, _, _ = lax.while_loop(cond, body, (state.log_eps, a0, 0))
    # one step back when doubling overshot: stay on the side with acceptance > target
    return jnp.where(direction > 0, log_eps - jnp.log(2.0), log_eps).astype(log_eps.dtype)


def chees_init(fn, w0, key, log_eps0, log_t0, search_step_size, default_trajectory) -> ChEESState:
    """Initial ensemble state at ``w0 [C, d]`` (traceable: all arguments may be traced).

    ``fn: w [d] → (U(w), aux)`` is the potential. With ``search_step_size`` the initial
    step size comes from the doubling/halving search started at ``exp(log_eps0)`` (its
    momenta drawn from ``key``); with ``default_trajectory`` the trajectory length starts
    at ``8ε``, else ``exp(log_t0)``. The iteration counter ``i`` starts at 0.
    """
    import jax.numpy as jnp
    from jax import lax

    vg = _value_and_grad(fn)
    dtype = w0.dtype
    u, g, aux = _unpack(vg(w0))
    d = w0.shape[1]
    f = lambda v: jnp.asarray(v, dtype)  # noqa: E731
    zero_d = jnp.zeros((d,), dtype)
    state = ChEESState(
        w=w0,
        u=u,
        g=g,
        aux=aux,
        inv_mass=jnp.ones((d,), dtype),
        log_eps=f(log_eps0),
        log_eps_bar=f(0.0),
        log_t=f(0.0),
        log_t_bar=f(0.0),
        da_h=f(0.0),
        da_mu=f(0.0),
        da_k=jnp.asarray(0, jnp.int32),
        adam_v=f(0.0),
        adam_k=jnp.asarray(0, jnp.int32),
        wf_n=f(0.0),
        wf_mean=zero_d,
        wf_m2=zero_d,
        i=jnp.asarray(0, jnp.int32),
    )
    log_eps = lax.cond(
        search_step_size,
        lambda: _step_size_search(vg, state, key),
        lambda: state.log_eps,
    )
    log_t = jnp.where(default_trajectory, log_eps + math.log(8.0), f(log_t0))
    return state._replace(
        log_eps=log_eps,
        log_eps_bar=log_eps,
        log_t=log_t,
        log_t_bar=log_t,
        da_mu=jnp.log(10.0).astype(dtype) + log_eps,
    )


def make_kernel(fn, params: ChEESParams, center=None) -> ChEESKernel:
    """ChEES-HMC as a :class:`ChEESKernel`: ``init`` and ``step(key, state, batch=None)``.

    ``fn: w [d] → (U(w), aux)`` is the potential and ``params`` the run's tuning constants
    (:func:`make_params`), closed over; everything that changes from one iteration to the
    next, the iteration counter included, lives in the :class:`ChEESState`. ``step``
    adapts while ``state.i < params.warmup``; afterwards ``ε = exp(log_eps_bar)`` and
    ``T = exp(log_t_bar)`` are fixed, so warmup and sampling are one function and no
    ``freeze`` is needed. Its randomness (momenta, acceptance uniforms, post-warmup
    jitter) comes from ``key`` alone: the same ``(key, state)`` gives the same result.
    With ``center`` (``w*``, ``[d]``) the info also carries the virial term
    ``(w − w*)·∇U(w)`` from the gradient the integrator already holds.

    The kernel is traceable: build it inside ``jax.jit`` with traced ``params`` to share
    one compilation between runs that differ only in tuning constants.
    """
    import jax
    import jax.numpy as jnp

    vg = _value_and_grad(fn)
    beta2, adam_eps = 0.95, 1e-8
    prm = params

    def init(
        position, key, log_eps0=0.0, log_t0=0.0, search_step_size=True, default_trajectory=True
    ) -> ChEESState:
        return chees_init(fn, position, key, log_eps0, log_t0, search_step_size, default_trajectory)

    def step(key, state: ChEESState, batch=None) -> tuple[ChEESState, ChEESInfo]:
        if batch is not None:
            raise ValueError("ChEES-HMC uses the full-data potential: batch must be None")
        dtype = state.w.dtype
        C, d = state.w.shape
        i = state.i
        adapting = i < prm.warmup
        log_eps = jnp.where(adapting, state.log_eps, state.log_eps_bar)
        log_t = jnp.where(adapting, state.log_t, state.log_t_bar)
        eps, traj = jnp.exp(log_eps), jnp.exp(log_t)
        # one random call per iteration (threefry compiles slowly on CPU): columns 0..d-1
        # are the momenta, column d the acceptance uniform Φ(z), [0, d+1] the jitter
        z = jax.random.normal(key, (C, d + 2), dtype)
        # Halton jitter in warmup (low-variance adaptation); i.i.d. uniform when sampling
        # (a time-homogeneous kernel, for which ESS estimates hold; module docstring)
        jit_u = jnp.where(
            adapting & prm.halton_warmup,
            halton(i + 1).astype(dtype),
            1.0 - jax.scipy.special.ndtr(z[0, d + 1]),  # uniform in (0, 1]
        )
        n_steps = jnp.clip(jnp.ceil(jit_u * traj / eps), 1, prm.max_leapfrog).astype(jnp.int32)
        sigma = jnp.sqrt(state.inv_mass)
        p0 = z[:, :d] / sigma
        h0 = state.u + 0.5 * jnp.sum(p0 * p0 * state.inv_mass, -1)
        w1, p1, u1, g1, aux1 = _leapfrog(
            vg, state.w, p0, state.u, state.g, state.aux, eps, state.inv_mass, n_steps
        )
        h1 = u1 + 0.5 * jnp.sum(p1 * p1 * state.inv_mass, -1)
        dh = h1 - h0
        finite = jnp.isfinite(dh) & jnp.all(jnp.isfinite(w1), -1)
        diverging = ~finite | (dh > DIVERGENCE_THRESHOLD)
        alpha = jnp.where(finite, jnp.exp(jnp.minimum(0.0, -jnp.where(finite, dh, 0.0))), 0.0)
        log_unif = jax.scipy.special.log_ndtr(z[:, d])  # log of a uniform(0, 1) draw
        accept = log_unif < jnp.where(finite, -dh, -jnp.inf)

        def sel(new, old):
            mask = accept.reshape((C,) + (1,) * (new.ndim - 1))
            return jnp.where(mask, new, old)

        w = sel(w1, state.w)
        u = sel(u1, state.u)
        g = sel(g1, state.g)
        aux = jax.tree.map(sel, aux1, state.aux)

        # ---- adaptation (kept only while adapting)
        t_int = n_steps.astype(dtype) * eps  # integration time actually used
        # ChEES gradient in whitened coordinates z = w/σ, velocity v = σ⊙p
        z0 = state.w / sigma
        z1 = jnp.where(finite[:, None], w1 / sigma, 0.0)
        v1 = jnp.where(finite[:, None], p1 * sigma, 0.0)
        a_sum = jnp.sum(alpha)
        z0c = z0 - z0.mean(0)
        z1c = z1 - jnp.sum(alpha[:, None] * z1, 0) / jnp.maximum(a_sum, 1e-20)
        chg = jnp.sum(z1c * z1c, -1) - jnp.sum(z0c * z0c, -1)
        g_c = jnp.where(finite, t_int * chg * jnp.sum(z1c * v1, -1), 0.0)
        grad = jnp.where(a_sum > 0, jnp.sum(alpha * g_c) / jnp.maximum(a_sum, 1e-20), 0.0)
        adam_k = state.adam_k + 1
        adam_v = beta2 * state.adam_v + (1 - beta2) * grad**2
        v_hat = adam_v / (1 - beta2 ** adam_k.astype(dtype))
        new_log_t = state.log_t + prm.learning_rate * grad / (jnp.sqrt(v_hat) + adam_eps)
        new_log_t = jnp.where(prm.adapt_trajectory, new_log_t, state.log_t)
        # dual averaging of the harmonic-mean acceptance
        hm = _harmonic_mean(alpha)
        da_k = state.da_k + 1
        kf = da_k.astype(dtype)
        da_h = (1 - 1 / (kf + _DA_T0)) * state.da_h + (prm.target_accept - hm) / (kf + _DA_T0)
        wt = kf**-_DA_KAPPA
        new_log_eps = jnp.where(
            prm.adapt_step_size, state.da_mu - jnp.sqrt(kf) / _DA_GAMMA * da_h, state.log_eps
        )
        new_log_eps_bar = jnp.where(
            prm.adapt_step_size,
            wt * new_log_eps + (1 - wt) * state.log_eps_bar,
            state.log_eps_bar,
        )
        # the trajectory may not exceed max_leapfrog steps, nor fall below one
        log_max = jnp.log(prm.max_leapfrog.astype(dtype))
        new_log_t = jnp.clip(new_log_t, new_log_eps, new_log_eps + log_max)
        new_log_t_bar = wt * new_log_t + (1 - wt) * state.log_t_bar
        # Welford accumulation of positions over the metric window
        in_window = jnp.any((i >= prm.window_starts) & (i < prm.window_ends))
        n_new = state.wf_n + C
        w_mean = w.mean(0)
        delta = w_mean - state.wf_mean
        mean_new = state.wf_mean + delta * C / n_new
        m2_new = state.wf_m2 + jnp.sum((w - w_mean) ** 2, 0) + delta**2 * state.wf_n * C / n_new
        wf_n = jnp.where(in_window, n_new, state.wf_n)
        wf_mean = jnp.where(in_window, mean_new, state.wf_mean)
        wf_m2 = jnp.where(in_window, m2_new, state.wf_m2)
        # metric update at a window end (Stan's regularisation), rescaling ε and T
        at_end = jnp.any(i + 1 == prm.window_ends) & (wf_n > 1)
        var = wf_m2 / jnp.maximum(wf_n - 1, 1)
        var = (wf_n / (wf_n + 5)) * var + 1e-3 * (5 / (wf_n + 5))
        new_inv_mass = jnp.where(at_end, var, state.inv_mass)
        shift = jnp.where(at_end, 0.5 * jnp.mean(jnp.log(state.inv_mass) - jnp.log(var)), 0.0)
        restart_eps = new_log_eps_bar + jnp.where(prm.adapt_step_size, shift, 0.0)
        restart_t = new_log_t_bar + shift
        zero = jnp.zeros((), dtype)
        adapted = state._replace(
            w=w,
            u=u,
            g=g,
            aux=aux,
            inv_mass=new_inv_mass,
            log_eps=jnp.where(at_end, restart_eps, new_log_eps),
            log_eps_bar=jnp.where(at_end, restart_eps, new_log_eps_bar),
            log_t=jnp.where(at_end, restart_t, new_log_t),
            log_t_bar=jnp.where(at_end, restart_t, new_log_t_bar),
            da_h=jnp.where(at_end, zero, da_h),
            da_mu=jnp.where(at_end, jnp.log(10.0).astype(dtype) + restart_eps, state.da_mu),
            da_k=jnp.where(at_end, 0, da_k),
            adam_v=jnp.where(at_end, zero, adam_v),
            adam_k=jnp.where(at_end, 0, adam_k),
            wf_n=jnp.where(at_end, zero, wf_n),
            wf_mean=jnp.where(at_end, zero, wf_mean),
            wf_m2=jnp.where(at_end, zero, wf_m2),
        )
        frozen = state._replace(w=w, u=u, g=g, aux=aux)
        new_state = jax.tree.map(lambda a, b: jnp.where(adapting, a, b), adapted, frozen)
        new_state = new_state._replace(i=i + 1)
        info = ChEESInfo(
            w=w,
            aux=aux,
            potential_energy=u,
            accept_prob=alpha,
            diverging=diverging,
            energy_error=dh,
            step_size=eps,
            num_steps=n_steps,
            trajectory_length=traj,
            harmonic_accept=hm,
            virial=None if center is None else jnp.sum((w - center) * g, axis=-1),
        )
        return new_state, info

    return ChEESKernel(init=init, step=step)


def iteration_key(key, i):
    """The key :func:`chees_sample` passes to iteration ``i`` of a run whose run key is
    ``key``: ``fold_in(key, i)``, so draw ``s`` does not depend on how the run is cut
    into blocks."""
    import jax

    return jax.random.fold_in(key, i)


def _make_block(fn, block: int, center=None):
    """``(state, key, params) → (state, infos)``: ``block`` iterations of the kernel in one
    ``lax.scan``, iteration ``state.i`` with key ``iteration_key(key, state.i)``."""
    from jax import lax

    def run(state, key, prm):
        step = make_kernel(fn, prm, center).step
        return lax.scan(lambda s, _: step(iteration_key(key, s.i), s), state, None, length=block)

    return run


def _windows(warmup: int, adapt_mass_matrix: bool) -> tuple[tuple, tuple]:
    """Metric windows ``[start, end)`` in iterations (none for warmup < 20)."""
    if not adapt_mass_matrix or warmup < 20:
        return (), ()
    ends = [max(2, int(round(f * warmup))) for f in _WINDOW_ENDS]
    starts = [int(round(_WINDOW_START * warmup))] + ends[:-1]
    return tuple(starts), tuple(ends)


def _shard_state(state: ChEESState, devices):
    """Place the chain axis of ``state`` across ``devices``; the rest is replicated."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(devices), ("chains",))
    rep = NamedSharding(mesh, PartitionSpec())

    def shard(x):
        spec = PartitionSpec("chains", *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    per_chain = ("w", "u", "g", "aux")
    return ChEESState(
        **{
            k: jax.tree.map(shard if k in per_chain else (lambda x: jax.device_put(x, rep)), v)
            for k, v in state._asdict().items()
        }
    )


def _host(x) -> np.ndarray:
    """``x`` whole, as NumPy, on this process: a chain-sharded array that spans other
    processes' devices (``jax.distributed``) is all-gathered (every process then holds
    every chain's draws)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pick_devices(chains: int, devices):
    """Devices to shard the chains over: the largest count ≤ available that divides C."""
    import jax

    if devices is None:
        devs = jax.devices()
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if devices < 1:
            raise ValueError(f"devices must be a positive integer or a list; got {devices!r}")
        devs = jax.devices()[:devices]
    else:
        devs = list(devices)
    n = len(devs)
    while chains % n:
        n -= 1
    return devs[:n]


def default_block_size(total: int) -> int:
    """About 20 blocks (at most 200 iterations each), sized to waste < 1 block-count of
    iterations at the end."""
    nblocks = max(1, min(20, math.ceil(total / 10)), math.ceil(total / 200))
    return math.ceil(total / nblocks)


def chees_sample(
    fn,
    w0,
    key,
    *,
    warmup: int,
    draws: int,
    target_accept: float = 0.651,
    step_size: float | None = None,
    trajectory_length: float | None = None,
    max_leapfrog: int = 1000,
    learning_rate: float = 0.025,
    warmup_jitter: str = "halton",
    adapt_step_size: bool = True,
    adapt_trajectory: bool = True,
    adapt_mass_matrix: bool = True,
    block_size: int | None = None,
    devices=None,
    progress: bool = True,
    desc: str = "ChEES-HMC",
    keep=("w",),
    cache: dict | None = None,
    center=None,
) -> dict:
    """Run ChEES-HMC on a JAX potential; the engine behind :func:`run_chees`.

    Parameters
    ----------
    fn : callable
        ``w [d] → (U(w), aux)``, a pure JAX function (``aux`` any pytree, e.g. ``L_n``).
    w0 : jax.Array [C, d]
        Initial positions, one row per chain (``C ≥ 2``).
    key : jax.random key
        Split into a run key and an initialisation key (the step-size search);
        iteration ``i`` gets ``iteration_key(run_key, i)``.
    warmup, draws : int
        Adaptation iterations (discarded) and kept iterations.
    keep : tuple of str
        Per-iteration fields to return for the draws, among ``"w"``, ``"aux"`` and, when
        ``center`` is given, ``"virial"`` (the scalar statistics are always returned).
    center : jax.Array [d], optional
        ``w*``: each iteration then also records the virial term ``(w − w*)·∇U(w)``
        from the gradient the integrator already holds.
    cache : dict, optional
        Compiled programs are stored here, keyed by shapes, dtype, block size and
        devices, and reused by later calls with the same ``fn`` (the caller keys the
        dict by ``fn``).

    Returns
    -------
    dict
        ``draws`` (``{field: array [draws, C, ...]}``), ``stats`` (``{name: [draws, C]}``:
        ``diverging``, ``accept_prob``, ``energy_error``, ``potential_energy``,
        ``step_size``, ``num_steps``), ``adapted`` (final ``step_size``,
        ``trajectory_length``, ``inv_mass``), ``warmup_divergences`` (per chain),
        ``warmup_gradients``, ``sample_gradients`` (chain-gradients), ``init_time_s``,
        ``compile_time_s`` (with ``compile_cached``), ``run_time_s``, ``block_size``, ``padding`` (iterations run
        past the end to fill the last block, discarded) and ``devices``.
    """
    import jax
    import jax.numpy as jnp

    C, d = (int(x) for x in w0.shape)
    dtype = w0.dtype
    total = warmup + draws
    block_size = int(block_size or default_block_size(total))
    nblocks = math.ceil(total / block_size)
    prm = make_params(
        warmup,
        target_accept=target_accept,
        max_leapfrog=max_leapfrog,
        learning_rate=learning_rate,
        adapt_step_size=adapt_step_size,
        adapt_trajectory=adapt_trajectory,
        adapt_mass_matrix=adapt_mass_matrix,
        dtype=dtype,
    )
    devs = _pick_devices(C, devices)
    cache = {} if cache is None else cache
    t0 = time.perf_counter()
    k_run, k_init = jax.random.split(key)
    init_args = (
        w0,
        k_init,
        jnp.asarray(0.0 if step_size is None else math.log(step_size), dtype),
        jnp.asarray(0.0 if trajectory_length is None else math.log(trajectory_length), dtype),
        jnp.asarray(step_size is None),
        jnp.asarray(trajectory_length is None),
    )
    ikey = ("init", C, d, str(dtype))
    bkey = ("block", C, d, str(dtype), block_size, tuple(str(x) for x in devs), center is not None)
    was_cached = ikey in cache and bkey in cache
    if ikey not in cache:
        cache[ikey] = jax.jit(partial(chees_init, fn)).lower(*init_args).compile()
    state = cache[ikey](*init_args)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    if not bool(jnp.all(jnp.isfinite(state.u))):
        bad = np.flatnonzero(~np.isfinite(np.asarray(state.u)))
        raise FloatingPointError(
            f"the potential is not finite at the initial point of chain(s) {bad[:8].tolist()}: "
            f"check w* (and init_jitter, if set)"
        )
    if len(devs) > 1:
        state = _shard_state(state, devs)
    t1 = time.perf_counter()
    if bkey not in cache:
        block = _make_block(fn, block_size, center)
        cache[bkey] = jax.jit(block).lower(state, k_run, prm).compile()
    compiled = cache[bkey]
    compile_s = time.perf_counter() - t1

    kept: dict[str, list] = {k: [] for k in keep}
    names = ("diverging", "accept_prob", "energy_error", "potential_energy")
    shared = ("step_size", "num_steps")  # one value per iteration, the same for all chains
    stats: dict[str, list] = {k: [] for k in names + shared}
    warm_div = np.zeros(C, dtype=np.int64)
    counts = {"warm_grads": 0, "sample_grads": 0, "div": 0}

    def advance(st, i0, n):
        st, info = compiled(st, k_run, prm)  # a whole block; the padding is dropped
        bufs = {k: _host(getattr(info, k))[:n] for k in names + shared}
        for k in keep:
            bufs[f"keep:{k}"] = jax.tree.map(lambda a: _host(a)[:n], getattr(info, k))
        return st, bufs

    def on_warmup(b):
        warm_div[:] += b["diverging"].sum(0)
        counts["warm_grads"] += int(b["num_steps"].sum()) * C

    def on_draws(s0, b):
        for k in names:
            stats[k].append(b[k])
        for k in shared:
            stats[k].append(np.repeat(b[k][:, None], C, 1))
        for k in keep:
            kept[k].append(b[f"keep:{k}"])
        counts["sample_grads"] += int(b["num_steps"].sum()) * C
        counts["div"] += int(b["diverging"].sum())

    def postfix(last):
        return {
            "eps": f"{float(last['step_size']):.2e}",
            "steps": int(last["num_steps"]),
            "acc": f"{float(np.mean(last['accept_prob'])):.2f}",
            "div": counts["div"],
        }

    state, run_s = run_blocks(
        advance,
        state,
        total=total,
        warmup=warmup,
        block=block_size,
        on_warmup=on_warmup,
        on_draws=on_draws,
        progress=progress,
        desc=desc,
        postfix=postfix,
    )
    warm_grads, sample_grads = counts["warm_grads"], counts["sample_grads"]
    return {
        "draws": {k: jax.tree.map(lambda *a: np.concatenate(a, 0), *v) for k, v in kept.items()},
        "stats": {k: np.concatenate(v, 0) for k, v in stats.items()},
        "adapted": {
            "step_size": float(np.exp(np.asarray(state.log_eps_bar))),
            "trajectory_length": float(np.exp(np.asarray(state.log_t_bar))),
            "inv_mass": np.asarray(state.inv_mass),
        },
        "warmup_divergences": warm_div,
        "warmup_gradients": warm_grads,
        "sample_gradients": sample_grads,
        "init_time_s": init_s,
        "compile_time_s": compile_s,
        "compile_cached": was_cached,
        "run_time_s": run_s,
        "block_size": block_size,
        "padding": int(nblocks * block_size - total),
        "devices": [str(x) for x in devs],
    }


# ---------------------------------------------------------------------------- condpost API
def _check_int(name, v, lo):
    if isinstance(v, bool) or int(v) != v or v < lo:
        raise ValueError(f"{name} must be an integer ≥ {lo}; got {v!r}")
    return int(v)


def run_chees(
    post: LocalPosterior,
    *,
    method: str = "chees",
    chains: int = 64,
    warmup: int = 1000,
    draws: int = 1000,
    seed: int = 0,
    progress: bool = True,
    target_accept: float = 0.651,
    init_jitter: float = 0.0,
    superchains: int | None = None,
    x64: bool | None = None,
    step_size: float | None = None,
    trajectory_length: float | None = None,
    max_leapfrog: int = 1000,
    learning_rate: float = 0.025,
    warmup_jitter: str = "halton",
    adapt_step_size: bool = True,
    adapt_trajectory: bool = True,
    adapt_mass_matrix: bool = True,
    block_size: int | None = None,
    devices=None,
):
    """Many-chain ChEES-HMC on ``post``'s potential exported to JAX.

    ``post.sample("chees", backend="jax", chains=64, ...)`` calls this. The potential
    ``U(w) = nβL_n(w) + γ/2‖w−w*‖² + Σ_c ρ_c D_c(w)`` is exported once
    (``condpost.export.to_jax``); see the module docstring for the algorithm.

    Parameters
    ----------
    post : LocalPosterior
        The declaration.
    chains : int
        Number of chains ``C ≥ 2`` (default 64; ChEES's across-chain estimates want
        dozens to hundreds, and a GPU runs them for the price of a few).
    warmup, draws : int
        Adaptation iterations (discarded) and kept iterations per chain.
    seed : int
        Same seed and settings → same draws.
    progress : bool
        tqdm bar, updated after each compiled block.
    target_accept : float
        Target of the harmonic mean over chains of the acceptance probability (0.651).
    init_jitter : float
        Superchain ``k`` starts at ``w* + init_jitter·ξ_k``, ``ξ_k ~ N(0, I)`` (all its
        chains at the same point, as nested R-hat assumes). Default 0: every chain at w*.
    superchains : int, optional
        Number of superchains for nested R-hat (default: ``chains/4`` when ``chains ≥ 8``
        and divisible by 4, else ``chains``). Must divide ``chains``.
    x64 : bool, optional
        float64 (True) or float32 (False); default: the declaration's dtype.
    step_size, trajectory_length : float, optional
        Initial values (defaults: a doubling/halving search, and 8 steps).
    max_leapfrog : int
        Cap on leapfrog steps per iteration (1000).
    learning_rate : float
        Adam rate on ``log T`` (0.025).
    warmup_jitter : {"halton", "uniform"}
        Trajectory-length jitter during warmup: the van der Corput sequence (default, as
        in the paper: lower-variance adaptation) or i.i.d. uniform numbers. After warmup
        the jitter is always i.i.d. uniform (a time-homogeneous kernel, so that ESS
        estimates are valid).
    adapt_step_size, adapt_trajectory, adapt_mass_matrix : bool
        Adapt the step size, the trajectory length and the diagonal metric during warmup
        (default True each). Without step-size adaptation, ``step_size`` is used as given.
    block_size : int, optional
        Iterations per compiled block (default: about 1/20 of the run). Does not change
        the draws; the last block may run a few iterations past the end (discarded).
    devices : int or list of jax devices, optional
        Devices to shard the chains over (default: all visible ones; the largest number
        that divides ``chains`` is used).

    Returns
    -------
    ReferenceClass
        ``sample_stats``: ``diverging``, ``accept_prob``, ``energy_error``,
        ``potential_energy``, ``step_size``, ``num_steps`` (leapfrog steps = gradient
        evaluations per chain), each ``[chains, draws]``. ``settings`` records the
        adapted step size, trajectory length and metric, export/compile/run times,
        gradient evaluations, warmup divergences, devices and ``nested_rhat``
        (``L_n`` and the worst coordinate).
    """
    chains = _check_int("chains", chains, 2)
    warmup = _check_int("warmup", warmup, 0)
    draws = _check_int("draws", draws, 1)
    max_leapfrog = _check_int("max_leapfrog", max_leapfrog, 1)
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1); got {target_accept!r}")
    if not (isinstance(init_jitter, (int, float)) and init_jitter >= 0):
        raise ValueError(f"init_jitter must be a number ≥ 0; got {init_jitter!r}")
    for name, v in (("step_size", step_size), ("trajectory_length", trajectory_length)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number (or None to adapt); got {v!r}")
    if not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a positive number; got {learning_rate!r}")
    if warmup_jitter not in ("halton", "uniform"):
        raise ValueError(f"warmup_jitter must be 'halton' or 'uniform'; got {warmup_jitter!r}")
    if block_size is not None:
        block_size = _check_int("block_size", block_size, 1)
    if superchains is None:
        superchains = default_superchains(chains)
    superchains = _check_int("superchains", superchains, 2)
    if chains % superchains:
        raise ValueError(
            f"superchains={superchains} must divide chains={chains} (nested R-hat groups the "
            f"chains into equal superchains); e.g. superchains={default_superchains(chains)}"
        )
    if x64 is not None and not isinstance(x64, bool):
        raise TypeError(f"x64 must be True, False or None (follow the posterior); got {x64!r}")
    if chains < 8:
        warn(
            f"chains={chains}: ChEES adapts from across-chain statistics and is meant for many "
            f"chains (e.g. 64–256); with few chains its step size and trajectory length are "
            f"noisy. Use method='nuts' for a handful of chains.",
            SamplerWarning,
        )
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:  # pragma: no cover - exercised without jax
        raise ImportError(
            f"method='chees' needs JAX: pip install condpost[jax] (import failed: {e})"
        ) from e

    use64 = (post.dtype == torch.float64) if x64 is None else x64
    with jax.enable_x64(use64):
        fn, cache, export_s, cached = _cached_potential(post, use64)
        fdtype = jnp.float64 if use64 else jnp.float32
        center = jnp.asarray(post.center.detach().cpu().numpy(), dtype=fdtype)
        key = jax.random.PRNGKey(int(seed))
        key, k_init = jax.random.split(key)
        M = chains // superchains
        w0 = jnp.broadcast_to(center, (chains, post.d))
        if init_jitter > 0:
            xi = jax.random.normal(k_init, (superchains, post.d), fdtype)
            w0 = w0 + float(init_jitter) * jnp.repeat(xi, M, axis=0)
        res = chees_sample(
            fn,
            w0,
            key,
            warmup=warmup,
            draws=draws,
            target_accept=float(target_accept),
            step_size=None if step_size is None else float(step_size),
            trajectory_length=None if trajectory_length is None else float(trajectory_length),
            max_leapfrog=max_leapfrog,
            learning_rate=float(learning_rate),
            warmup_jitter=warmup_jitter,
            adapt_step_size=bool(adapt_step_size),
            adapt_trajectory=bool(adapt_trajectory),
            adapt_mass_matrix=bool(adapt_mass_matrix),
            block_size=block_size,
            devices=devices,
            progress=progress,
            desc=f"ChEES-HMC {chains} chains",
            keep=("w", "aux", "virial"),
            cache=cache,
            center=center,
        )
    W = np.swapaxes(res["draws"]["w"], 0, 1)  # [C, S, d]
    stats = {k: np.swapaxes(v, 0, 1) for k, v in res["stats"].items()}
    stats["diverging"] = stats["diverging"].astype(bool)
    stats["num_steps"] = stats["num_steps"].astype(np.int64)
    adapted = res["adapted"]
    inv_mass = adapted["inv_mass"]
    settings = {
        "method": "chees",
        "backend": "jax",
        "chains": chains,
        "warmup": warmup,
        "draws": draws,
        "seed": int(seed),
        "superchains": superchains,
        "x64": use64,
        "target_accept": float(target_accept),
        "init_jitter": float(init_jitter),
        "warmup_jitter": warmup_jitter,
        "max_leapfrog": max_leapfrog,
        "learning_rate": float(learning_rate),
        "adapt_step_size": bool(adapt_step_size),
        "adapt_trajectory": bool(adapt_trajectory),
        "adapt_mass_matrix": bool(adapt_mass_matrix),
        "step_size": adapted["step_size"],
        "trajectory_length": adapted["trajectory_length"],
        "mean_num_steps": float(stats["num_steps"][0].mean()),
        "inv_mass": inv_mass.tolist() if inv_mass.size <= 1000 else None,
        "inv_mass_range": [float(inv_mass.min()), float(inv_mass.max())],
        "block_size": res["block_size"],
        "padding_iterations": res["padding"],
        "export_time_s": export_s,
        "export_cached": cached,
        "init_time_s": res["init_time_s"],
        "compile_time_s": res["compile_time_s"],
        "compile_cached": res["compile_cached"],
        "run_time_s": res["run_time_s"],
        "wall_time_s": res["init_time_s"] + res["compile_time_s"] + res["run_time_s"],
        "gradient_evaluations": int(res["warmup_gradients"] + res["sample_gradients"] + chains),
        "warmup_divergences": res["warmup_divergences"].tolist(),
        "jax_devices": res["devices"],
        "versions": _versions(),
    }
    loss = np.swapaxes(np.asarray(res["draws"]["aux"]), 0, 1).astype(np.float64)
    virial = np.swapaxes(np.asarray(res["draws"]["virial"]), 0, 1).astype(np.float64)
    # recorded, not warned about: with very short chains its stationary value (and the
    # ESS it is judged by) is itself uncertain; docs/chees.md explains how to read it
    settings["nested_rhat"] = _nested_rhat_report(loss, W, superchains)
    out = {f"sampler/{k}": v for k, v in stats.items()}
    out["loss"], out["virial"] = loss, virial
    W = W.astype(torch.empty((), dtype=post.dtype).numpy().dtype, copy=False)
    return SampleResult(draws=W, stats=out, settings=settings)


def _nested_rhat_report(loss, W, superchains: int) -> dict:
    """Nested R-hat of ``L_n`` and of every coordinate, with the value stationary chains
    would give and a flag.

    For independent stationary chains ``nR̂² − 1 ≈ K/ESS`` (``Var(superchain mean) ≈
    σ²·K/ESS``, ``Ŵν ≈ σ²``), so short runs exceed 1.01 by chance. ``above_stationary``
    lists the quantities whose ``nR̂² − 1`` exceeds both ``1.01² − 1`` and the 99.9%
    point of ``χ²_{K−1}/(K−1)`` (Wilson–Hilferty approximation) times ``K/ESS``; with
    chains of a few draws the ESS is itself rough, so treat it as a hint.
    """
    from ..diagnostics import ess_bulk

    K = superchains
    nu = K - 1
    q = nu * (1 - 2 / (9 * nu) + 3.09 * math.sqrt(2 / (9 * nu))) ** 3 / nu

    def one(x):
        r = np.atleast_1d(nested_rhat(x, K))
        ess = np.atleast_1d(np.asarray(ess_bulk(x), dtype=float))
        expected = np.sqrt(1 + K / ess)
        bad = np.isfinite(r) & (r**2 - 1 > np.maximum(1.01**2 - 1, q * K / ess))
        return r, expected, bad

    r_l, e_l, b_l = one(np.asarray(loss))
    r_w, e_w, b_w = one(W)
    ok = np.isfinite(r_w)
    i = int(np.nanargmax(np.where(ok, r_w, -np.inf))) if ok.any() else None
    flag = [f"{r_l[0]:.3f} (L_n)"] if b_l[0] else []
    if b_w.any():
        j = int(np.argmax(np.where(b_w, r_w, -np.inf)))
        flag.append(f"{r_w[j]:.3f} (coordinate {j})")
    return {
        "L_n": float(r_l[0]),
        "L_n_stationary": float(e_l[0]),
        "worst_weight": float(r_w[i]) if i is not None else float("nan"),
        "worst_weight_index": i,
        "worst_weight_stationary": float(e_w[i]) if i is not None else float("nan"),
        "superchains": K,
        "above_stationary": ", ".join(flag),
    }


def _versions() -> dict:
    import jax

    return {"jax": jax.__version__}


# Exports are cached on the declaration (they live as long as it does), keyed by what they
# depend on: precision, the constraint list, nβ, γ and the version counter of w*.
_CACHE_ATTR = "_condpost_chees_cache"


def _cached_potential(post, use64: bool):
    """``(fn, programs, export_seconds, cached)``: ``fn(w) = (U(w), L_n(w))`` in JAX and
    the dict of compiled programs that belong to it."""
    from ..export import to_jax

    c = post.center
    key = (
        use64,
        tuple(id(b) for b in post.constraints),
        float(post.nbeta),
        float(post.localization),
        id(c),
        c._version,
    )
    store = post.__dict__.setdefault(_CACHE_ATTR, {})
    if key in store:
        fn, programs = store[key]
        return fn, programs, 0.0, True
    store.clear()  # the declaration changed: drop stale programs
    dtype = torch.float64 if use64 else torch.float32
    jp = to_jax(post, dtype=None if dtype == post.dtype else dtype)
    fn = jp.potential_and_loss
    store[key] = (fn, {})
    return fn, store[key][1], float(jp.export_seconds), False
