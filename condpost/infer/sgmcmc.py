"""Stochastic-gradient MCMC on the local potential, with chains vectorized by ``torch.func``.

All three samplers target ``π(w) ∝ e^{−U(w)}`` with the potential (docs/theory.md §1.5)

.. math::

    U(w) = n\\beta\\,L_n(w) + \\tfrac{\\gamma}{2}\\|w-w^*\\|^2 + \\sum_c \\rho_c D_c(w),

and replace ``L_n`` by the mean loss ``L_B`` on a minibatch ``B`` of ``m`` samples drawn
*with replacement* (so each batch is independent of the current weights). Constraints
are evaluated full-batch on their fixed probes. Writing ``g = ∇U_B(w)`` and ``ξ ~ N(0, I)``:

* ``sgld`` (Welling & Teh 2011; devinterp's convention, docs/theory.md §1.5):
  ``w' = w − (ε/2) g + √ε ξ``.
* ``rmsprop_sgld`` (preconditioned SGLD, Li, Chen, Carlson & Carin 2016, AAAI,
  "Preconditioned stochastic gradient Langevin dynamics for deep neural networks"):
  ``V' = α V + (1 − α) g⊙g``, ``G = 1/(δ + √V̂)`` with the bias-corrected
  ``V̂ = V'/(1 − α^t)``, and ``w' = w − (ε/2) G⊙g + √(εG)⊙ξ``. During the first
  ``1/(1 − α)`` steps ``G = 1`` (plain SGLD) while ``V`` accumulates, so a start at a
  point of zero gradient does not give ``G = 1/δ``. The correction term Γ of
  Li et al. is dropped, as in their practical algorithm. By default the preconditioner
  adapts during warmup only and is frozen while draws are kept, which makes the kept
  chain an exact (up to O(ε)) Langevin discretisation with a constant diagonal metric.
* ``sghmc`` (Chen, Fox & Guestrin 2014, ICML, "Stochastic gradient Hamiltonian Monte
  Carlo", eq. 15, with β̂ = 0): ``v' = (1 − α) v − η g + √(2αη) ξ``, ``w' = w + v'``;
  ``η`` is ``step_size`` and ``α`` is ``friction``. With ``friction=1`` it is SGLD with
  ``ε = 2η``. The minibatch-gradient noise ``η² V_g`` per step adds to the injected
  ``2αη``, inflating the stationary variance by about ``η V_g/(2α)`` relative.
* ``sgnht`` (Ding, Fang, Babbush, Chen, Skeel & Neven 2014, NeurIPS, "Bayesian sampling
  using stochastic gradient thermostats", Alg. 1, in the units ``v = p h``, ``η = h²``,
  ``ζ = ξh``, ``a = Ah``): ``v' = (1 − ζ) v − η g + √(2aη) ξ``, ``w' = w + v'``,
  ``ζ' = ζ + ‖v'‖²/d − η/(1 − ζ/2)``, one thermostat ``ζ`` per chain, started at ``a`` =
  ``friction``. The thermostat raises the friction until the kinetic energy is at unit
  temperature, which absorbs the (unknown) gradient noise that biases SGHMC. Ding et al.
  target ``‖v‖²/d = η``, their h → 0 limit; at a per-step friction ζ of order 0.1 the
  stationary ``E‖v'‖²/d`` of the discrete update at unit temperature is ``η/(1 − ζ/2)``
  (the OU part solved exactly: ``2aη/(2ζ − ζ²)`` at ``ζ = a``), and targeting ``η``
  instead cools the chain by ζ/2 (−5% in λ̂ at ζ = 0.1). With this target the
  thermostat's fixed point is ``ζ = a + η V_g/2`` with ``V_g`` the per-coordinate
  minibatch-gradient variance: Chen et al.'s noise-matched friction, found without
  estimating ``V_g``.

Chains are a ``[chains, d]`` weight batch pushed through
``torch.func.vmap(torch.func.grad_and_value(U_B))`` over a functional call of the
network, each chain with its own minibatch. Frozen parameters are constants of the
functional call: they get no gradient. Every chain has its own random stream (a torch
generator seeded from ``numpy.random.SeedSequence(seed).spawn(chains)``, the same rule
as the NUTS driver), whose state is part of the sampler state: the same seed gives the
same draws, chain ``c`` does not depend on how many chains run beside it or whether they
are vectorized, and a run resumed from a checkpoint continues exactly.

Per-step cost. The driver adds little to the update itself (``benchmarks/sgld_overhead.py``
compares one chain with a hand-written PyTorch SGLD loop): the network runs with the
chain's weights put straight into its parameter slots (``_fast_forward``; no
``functional_call`` bookkeeping per call), the minibatch-mean NLL of the built-in
likelihoods is fused (the likelihood's ``mean_nll``), the localizer's gradient ``γ(w − w*)`` is added in
closed form, one chain is differentiated without ``vmap``, the ``w*`` half of the paired
loss estimators is gathered from the per-sample ``ℓ_i(w*)`` computed once, the draws'
independent-batch losses are evaluated per window in grouped vmapped forward passes, the
reverse pass of an unconstrained potential is seeded with ``nβ`` directly, the random
streams stay live generators between checkpoints, and the per-draw statistics and the
divergence checks are computed per window of draws (one host transfer per window, no
synchronisation per step). The draws and statistics are those of the plain step-by-step
computation (same random streams; equal up to floating-point rounding).

The kernels follow the sampler contract (docs/architecture.md): ``kernel.init(chains, seed) ->
state`` and ``kernel.step(rng_key, state, batch=None) -> (state, info)`` with immutable
``NamedTuple`` state; ``run_sgmcmc`` (behind ``LocalPosterior.sample``) drives them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .._batching import batched as _batched
from .._errors import SamplerWarning, warn
from ..potential import Potential
from .base import SampleResult

if TYPE_CHECKING:  # pragma: no cover
    from ..posterior import LocalPosterior

__all__ = [
    "SGMCMCState",
    "StepInfo",
    "SGMCMCKernel",
    "sgld",
    "rmsprop_sgld",
    "sghmc",
    "sgnht",
    "make_kernel",
    "run_sgmcmc",
    "chain_generators",
]

METHODS = ("sgld", "rmsprop_sgld", "sghmc", "sgnht")


# ---------------------------------------------------------------------------------------
# state, info, kernel
# ---------------------------------------------------------------------------------------


class SGMCMCState(NamedTuple):
    """Immutable sampler state for ``C`` chains.

    Attributes
    ----------
    w : Tensor ``[C, d]``
        Current lifted weights of every chain.
    rng : tuple of Tensor
        Per-chain torch generator states (the chains' random streams).
    step : int
        Number of steps taken so far.
    momentum : Tensor ``[C, d]`` or None
        SGHMC/SGNHT velocity ``v``.
    sq_avg : Tensor ``[C, d]`` or None
        RMSProp running average ``V`` of ``g⊙g``.
    adapt_steps : int
        Number of steps that updated ``sq_avg`` (bias correction).
    adapting : bool
        Whether the RMSProp preconditioner is still adapting.
    batch_keys : tuple of int or None
        Per-chain keys of the minibatch index streams (the chain seeds): the batch of
        step ``t`` is a pure function of ``(key, t)``. None: batches are drawn from
        ``rng`` instead.
    thermostat : Tensor ``[C]`` or None
        SGNHT's per-chain friction ``ζ``.
    """

    w: torch.Tensor
    rng: tuple
    step: int = 0
    momentum: torch.Tensor | None = None
    sq_avg: torch.Tensor | None = None
    adapt_steps: int = 0
    adapting: bool = True
    batch_keys: tuple | None = None
    thermostat: torch.Tensor | None = None


class StepInfo(NamedTuple):
    """What one step saw at its *input* weights ``w_t`` (one entry per chain).

    Attributes
    ----------
    loss : Tensor ``[C]``
        Minibatch loss ``L_B(w_t)``. The batch is drawn independently of ``w_t``, so this
        is an unbiased estimate of ``L_n(w_t)`` (used for the progress bar and traces).
    potential : Tensor ``[C]``
        Minibatch potential ``U_B(w_t)``.
    virial : Tensor ``[C]``
        ``(w_t − w*)·∇U_B(w_t)``, an unbiased estimate of the virial term (docs/theory.md §5.2).
    grad : Tensor ``[C, d]``
        ``∇U_B(w_t)``.
    precond : Tensor ``[C, d]`` or None
        RMSProp-SGLD's diagonal preconditioner ``G`` used for this step.
    batch : tuple (XB, YB)
        The minibatch ``[C, m, ...]`` the gradient used.
    index : Tensor ``[C, m]`` or None
        The minibatch's row indices into the data (None for a batch passed in).
    """

    loss: torch.Tensor
    potential: torch.Tensor
    virial: torch.Tensor
    grad: torch.Tensor
    precond: torch.Tensor | None = None
    batch: tuple | None = None
    index: torch.Tensor | None = None


class SGMCMCKernel(NamedTuple):
    """A pair of pure functions ``init(chains, seed, w0=None) -> state`` and
    ``step(rng_key, state, batch=None) -> (state, info)``, plus the pieces the driver
    and the diagnostics reuse."""

    init: Callable
    step: Callable
    method: str
    step_size: float
    batch_size: int
    draw_batch: Callable
    potential_and_grad: Callable
    settings: dict
    advance: Callable | None = None
    live: Callable | None = None
    info_stats: tuple = ()


def chain_generators(seeds: list[int], device) -> tuple:
    """Initial per-chain generator states from per-chain seeds."""
    out = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        out.append(g.get_state())
    return tuple(out)


class _Streams:
    """Scratch generators: ``load(states)`` sets them, ``dump()`` reads them back.

    The sampler state owns the random streams (as generator *states*); these
    generators are reloaded at the start of every step, so ``step`` stays a pure
    function of its inputs.
    """

    def __init__(self, device) -> None:
        self.device = device
        self.gens: list[torch.Generator] = []

    def load(self, states) -> list[torch.Generator]:
        while len(self.gens) < len(states):
            self.gens.append(torch.Generator(device=self.device))
        for g, s in zip(self.gens, states, strict=False):
            g.set_state(s)
        return self.gens[: len(states)]

    def dump(self, n: int) -> tuple:
        return tuple(g.get_state() for g in self.gens[:n])


# ---------------------------------------------------------------------------------------
# potential on a minibatch, vectorized over chains
# ---------------------------------------------------------------------------------------


def _fast_forward(post: LocalPosterior) -> Callable:
    """``f(w [d], x) -> output``, equal to ``post.lifted.forward(w, x)`` but cheaper per call.

    ``torch.func.functional_call`` re-derives the module's parameter and buffer slots
    (tied names, submodule look-ups) on every call; at small networks that bookkeeping
    costs more than the forward pass. Here the slots ``(module._parameters, name)`` are
    resolved once, and each call puts the views of ``w`` (and the frozen constants)
    into them, runs the module and puts the originals back, exactly what
    ``functional_call`` does. Works under ``vmap``. Checked once against
    ``lifted.forward`` at ``w*`` on a few data rows; any difference (or a network whose
    slots cannot be resolved) falls back to ``lifted.forward``.
    """
    lifted = post.lifted
    net = lifted.net
    try:
        canon: dict[int, str] = {}
        slots = []
        for kind, items in (
            ("_parameters", net.named_parameters(remove_duplicate=False)),
            ("_buffers", net.named_buffers(remove_duplicate=False)),
        ):
            for name, t in items:
                key = canon.setdefault(id(t), name)
                path, _, attr = name.rpartition(".")
                slots.append((getattr(net.get_submodule(path), kind), attr, key))
    except Exception:  # noqa: BLE001 - unusual module: the general path
        return lifted.forward
    frozen = dict(lifted.frozen)
    parts = list(zip(lifted.names, lifted.offsets, lifted.numels, lifted.shapes, strict=True))
    keys = set(frozen) | {p[0] for p in parts}
    if any(k not in keys for _, _, k in slots):
        return lifted.forward

    numels = [p[2] for p in parts]

    def fwd(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        vals = dict(frozen) if frozen else {}
        lead = w.shape[:-1]
        # one split (its backward is one concatenation) rather than a slice per parameter
        for (n, _, _, shp), piece in zip(parts, w.split_with_sizes(numels, -1), strict=True):
            vals[n] = piece.view(*lead, *shp)
        old = []
        try:
            for dct, attr, key in slots:
                old.append(dct[attr])
                dct[attr] = vals[key]
            return net(x)
        finally:
            for (dct, attr, _), t in zip(slots, old, strict=False):
                dct[attr] = t

    try:
        with torch.no_grad():
            x0 = post.data.head(min(4, post.n))[0]
            a, b = fwd(post.center, x0), lifted.forward(post.center, x0)
        if not (isinstance(a, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)):
            return lifted.forward
    except Exception:  # noqa: BLE001
        return lifted.forward
    return fwd


def _potential_fns(pot: Potential, *, vectorize: bool | str = "auto", compile: bool = False):
    """Return ``f(W [C,d], XB [C,m,...], YB [C,m,...]) -> (grad [C,d], U [C], L_B [C])``.

    ``U_B(w) = nβ L_B(w) + γ/2‖w − w⁰‖² + Σ_c ρ_c D_c(w)``, from the ``Potential``:
    autograd differentiates ``pot.data_terms`` (``nβ L_B + Σ_c ρ_c D_c``) only; the
    localizer's gradient ``γ(w − w⁰)`` is added in closed form. Chains are vectorized with
    ``torch.func.vmap`` when the network allows it (a per-chain loop otherwise); one
    chain runs without ``vmap``. Without constraints, one chain seeds its reverse pass
    through the likelihood's ``mean_nll_parts`` (no product node per step).
    """
    from torch.func import vmap

    post = pot.post
    lik = post.likelihood
    bound = post.constraints
    nb, gam, anchor = pot.nbeta, pot.localization, pot.anchor
    forward = _fast_forward(post)

    def obj(w, xb, yb):
        return pot.data_terms(w, (xb, yb), forward)

    # Chains are independent, so ∇_W Σ_c U_c(W_c) stacks the per-chain gradients: one
    # reverse pass through the vmapped forward (cheaper than vmap(grad(...)) in eager mode).
    # vectorize=True: vmap or fail; "auto": the one "vmap, else loop" helper.
    net_name = type(post.lifted.net).__name__
    batched = vmap(obj) if vectorize is True else _batched(obj, f"SG-MCMC gradients ({net_name})")
    mode = {"vmap": vectorize in ("auto", True)}

    # without constraints U_B = nβ·L_B: the reverse pass starts from L_B with the seed nβ
    # (no product node, no unit seed tensor per step)
    seed = torch.tensor(nb, dtype=post.dtype, device=post.device)
    seeds: dict[tuple, list] = {}
    parts = lik.mean_nll_parts

    def with_grad(fn, W, XB, YB, potential=True):
        if W.shape[0] == 1:  # one chain: differentiate w.r.t. the unbatched vector
            w = W.detach().view(-1).requires_grad_(True)
            with torch.enable_grad():
                if bound:
                    u, loss = obj(w, XB[0], YB[0])
                    (g,) = torch.autograd.grad(u, w)
                else:
                    out = forward(w, XB[0])
                    pr = parts(out, YB[0])
                    if pr is not None:  # L_B = scale·raw + const: seed the pass with nβ·scale
                        raw, sc, cst = pr
                        sd = seeds.get((sc, cst))
                        if sd is None:
                            sd = seeds[(sc, cst)] = [
                                torch.tensor(v, dtype=raw.dtype, device=raw.device)
                                for v in (nb * sc, cst)
                            ]
                        (g,) = torch.autograd.grad(raw, w, sd[0])
                        loss = torch.add(sd[1], raw.detach(), alpha=sc)  # const + scale·raw
                    else:
                        loss = lik.mean_nll(out, YB[0])
                        (g,) = torch.autograd.grad(loss, w, seed)
                    u = None
            diff = w.detach() - anchor
            g = g.add(diff, alpha=gam).view(1, -1) if gam else g.view(1, -1)
            if potential == "dist2":
                u = diff.dot(diff).view(1)
            elif potential:
                u = nb * loss.detach() if u is None else u.detach()
                u = torch.add(u, diff.dot(diff), alpha=0.5 * gam).view(1)
            return g, (u if potential else None), loss.detach().view(1)
        else:
            w = W.detach().requires_grad_(True)
            with torch.enable_grad():
                u, loss = fn(w, XB, YB)
                (g,) = torch.autograd.grad(u.sum(), w)
        diff = W - anchor
        if gam:
            g = g.add_(diff, alpha=gam)  # g is autograd's fresh output: updated in place
        if potential:  # ‖w − w⁰‖² per chain as a batched dot product (no temporary)
            d2 = torch.bmm(diff.unsqueeze(1), diff.unsqueeze(2)).view(-1)
            u = d2 if potential == "dist2" else u.detach() + (0.5 * gam) * d2
        else:
            u = None
        return g, u, loss.detach()

    def loop(w, XB, YB):
        if w.shape[0] == 1:
            u, loss = obj(w[0], XB[0], YB[0])
            return u.unsqueeze(0), loss.unsqueeze(0)
        outs = [obj(w[c], XB[c], YB[c]) for c in range(w.shape[0])]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])

    if compile:
        from torch.func import grad_and_value

        def u_full(w, xb, yb):
            u, loss = pot.data_terms(w, (xb, yb))
            return u + pot.localizer(w), loss

        compiled = torch.compile(vmap(grad_and_value(u_full, has_aux=True)), dynamic=False)

    def f(W, XB, YB, potential=True):
        if compile and mode.get("compiled", True):
            try:
                g, (u, loss) = compiled(W, XB, YB)
                return g.detach(), u.detach(), loss.detach()
            except Exception as err:  # noqa: BLE001
                mode["compiled"] = False
                warn(
                    f"compile=True: torch.compile failed on this network ({type(err).__name__}: "
                    f"{str(err)[:200]}); continuing uncompiled.",
                    SamplerWarning,
                )
        if W.shape[0] == 1:
            return with_grad(loop, W, XB, YB, potential)
        if not mode["vmap"]:
            # one chain at a time, each through the one-chain gradient: chain c then equals
            # a 1-chain run exactly, and large networks (whose gradient arithmetic dominates)
            # run faster than under vmap on a CPU
            parts = [
                with_grad(loop, W[c : c + 1], XB[c : c + 1], YB[c : c + 1], potential)
                for c in range(W.shape[0])
            ]
            g = torch.cat([p[0] for p in parts])
            u = None if parts[0][1] is None else torch.cat([p[1] for p in parts])
            return g, u, torch.cat([p[2] for p in parts])
        return with_grad(batched, W, XB, YB, potential)

    def vectorized() -> bool:
        """Whether the chains were batched with vmap (no fallback to the loop)."""
        return bool(mode["vmap"]) and not getattr(batched, "failed", False)

    f.mode = mode  # type: ignore[attr-defined]
    f.vectorized = vectorized  # type: ignore[attr-defined]
    f.forward = forward  # type: ignore[attr-defined]
    return f


def _loss_fn(post: LocalPosterior, forward: Callable | None = None):
    """``f(W [C,d], XB, YB) -> L_B [C]`` (no gradient), vectorized over chains."""
    forward = post.lifted.forward if forward is None else forward
    mean_nll = post.likelihood.mean_nll

    def one(w, xb, yb):
        return mean_nll(forward(w, xb), yb)

    batched = _batched(one, f"minibatch losses ({type(post.lifted.net).__name__})")

    def f(W, XB, YB):
        with torch.no_grad():
            if W.shape[0] == 1:
                return one(W[0], XB[0], YB[0]).unsqueeze(0)
            return batched(W, XB, YB)

    return f


def _center_batch_loss(post: LocalPosterior, XB, YB) -> torch.Tensor:
    """``L_B(w*)`` for each chain's batch ``[C, m, ...]`` in one forward pass."""
    C, m = XB.shape[:2]
    with torch.no_grad():
        out = post.lifted.forward(post.center, XB.reshape(C * m, *XB.shape[2:]))
        nll = post.likelihood.nll(out, YB.reshape(C * m, *YB.shape[2:]))
    return nll.reshape(C, m).mean(1)


def _center_nll(post: LocalPosterior, rows: int = 8192) -> torch.Tensor:
    """Per-sample NLL ``ℓ_i(w*)`` of every data point ``[n]`` (one pass, in blocks).

    ``L_B(w*)`` of a batch with indices ``idx`` is then ``ℓ(w*)[idx].mean()``: the
    paired loss estimators need it at every measured draw, and ``w*`` never moves. A
    streamed source is read in its own batches (``post.data.batches()``): the pass holds
    one batch, and the result is ``n`` numbers, not the data.
    """
    src = post.data
    with torch.no_grad():
        out = [
            post.likelihood.nll(post.lifted.forward(post.center, xb), yb)
            for xb, yb in src.batches(rows if src.in_memory else None)
        ]
    return torch.cat(out)


class _IndexStream:
    """Minibatch row indices as a pure function of (chain key, slot), with replacement.

    Slot ``j`` of chain ``c`` gets ``m`` indices, row ``j % B`` of a block of ``B`` slots
    drawn by a generator seeded from ``SeedSequence([key_c, j // B, tag])`` (the seeding
    rule of ``chain_seeds``). So the batches
    do not depend on when or how often they are asked for (checkpoints, callbacks,
    resumed runs, windows), nor on the other chains; and a block of ``B`` slots costs
    one generator call per chain instead of one per slot. ``tag`` separates the
    gradient batches from the loss-measurement batches.
    """

    GRADIENT, LOSS = 0x6AD, 0x1055

    def __init__(self, n: int, m: int, device, tag: int) -> None:
        self.n, self.m, self.device, self.tag = int(n), int(m), device, int(tag)
        self.block = max(1, min(64, (1 << 17) // max(self.m, 1)))
        self.cache: dict[tuple, torch.Tensor] = {}  # (keys, block) -> [B, C, m]
        self.gen = torch.Generator(device=device)

    def _block(self, keys: tuple, b: int) -> torch.Tensor:
        hit = self.cache.get((keys, b))
        if hit is None:
            if len(self.cache) > 2:
                self.cache.pop(next(iter(self.cache)))
            rows = []
            for key in keys:
                seq = np.random.SeedSequence([key, b, self.tag])
                self.gen.manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0]))
                rows.append(
                    torch.randint(
                        self.n, (self.block, self.m), generator=self.gen, device=self.device
                    )
                )
            hit = self.cache[(keys, b)] = torch.stack(rows, 1)
        return hit

    def row(self, keys: tuple, j: int) -> torch.Tensor:
        """Indices ``[C, m]`` of slot ``j``."""
        return self._block(keys, j // self.block)[j % self.block]

    def rows(self, keys: tuple, js: list[int]) -> torch.Tensor:
        """Indices ``[len(js), C, m]`` of the slots ``js``."""
        return torch.stack([self.row(keys, j) for j in js])


def _grouped_loss(
    post: LocalPosterior, measure: Callable, W: torch.Tensor, idx: torch.Tensor, min_group: int = 1
):
    """``L_B(w)`` of many weight vectors ``W [K, d]`` on their batches ``idx [K, m]``.

    Groups of ``G`` vectors go through one vmapped, gradient-free forward pass, so a
    window of draws costs a few calls instead of one per draw (the per-call overhead
    dominates small networks). ``G·m·(d + 8·size(x_i))`` is kept under 2²³, a proxy for
    the forward pass's working memory (parameters touched and activations per row), but
    ``G`` is at least ``min_group`` (the chains, which the gradient step evaluates at once).
    """
    K, m = idx.shape
    src = post.data
    xl, yl = src.x_like, src.y_like
    per_row = post.d + 8 * (xl[0].numel() + yl[0].numel())
    G = max(1, min(K, max(int(min_group), (1 << 23) // max(m * per_row, 1))))
    out = []
    for a in range(0, K, G):
        flat = idx[a : a + G].reshape(-1)
        g = min(G, K - a)
        X, Y = src.gather(flat)
        XB = X.view(g, m, *X.shape[1:])
        YB = Y.view(g, m, *Y.shape[1:])
        out.append(measure(W[a : a + G], XB, YB))
    return torch.cat(out) if len(out) > 1 else out[0]


def _batch_drawer(post: LocalPosterior, batch_size: int):
    """``draw(gens, step=None, keys=None) -> (XB, YB, idx)``: ``batch_size`` indices per
    chain, with replacement. With the chains' ``keys`` (``SGMCMCState.batch_keys``) the
    batch of step ``t`` is slot ``t`` of their gradient ``_IndexStream``; without them
    (a state made by hand) it is drawn from the chains' generators ``gens``."""
    src, n = post.data, post.n
    src.require_random_access("SG-MCMC (minibatch sampling)")
    dev = post.device
    stream = _IndexStream(n, batch_size, dev, _IndexStream.GRADIENT)

    def draw(gens, step: int | None = None, keys: tuple | None = None):
        m = batch_size
        C = len(gens)
        if m >= n:
            idx = torch.arange(n, device=dev).expand(C, n)
        elif keys is not None and step is not None:
            idx = stream.row(keys, int(step))
        elif C == 1:
            idx = torch.randint(n, (1, m), generator=gens[0], device=dev)
        else:
            idx = torch.stack([torch.randint(n, (m,), generator=g, device=dev) for g in gens])
        X, Y = src.gather(idx.reshape(-1))
        return X.view(C, -1, *X.shape[1:]), Y.view(C, -1, *Y.shape[1:]), idx

    return draw


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


def make_kernel(
    post: LocalPosterior,
    method: str = "sgld",
    *,
    step_size: float,
    batch_size: int | None = None,
    friction: float = 0.1,
    alpha: float = 0.99,
    eps: float = 1e-8,
    potential: Potential | None = None,
    vectorize: bool | str = "auto",
    compile: bool = False,
) -> SGMCMCKernel:
    """Build an SG-MCMC kernel for ``post``.

    Parameters
    ----------
    post : LocalPosterior
        The declaration; its potential is used with minibatch losses.
    method : {"sgld", "rmsprop_sgld", "sghmc", "sgnht"}
        Update rule (module docstring).
    step_size : float
        ε for SGLD and RMSProp-SGLD, the learning rate η for SGHMC.
    batch_size : int, optional
        Minibatch size ``m`` (default ``min(n, 256)``); ``m ≥ n`` uses the full batch.
    friction : float
        SGHMC friction α in (0, 1] (default 0.1); for SGNHT the injected-noise level ``a``
        and the thermostat's starting value.
    alpha, eps : float
        RMSProp decay α (default 0.99) and stabiliser δ (default 1e-8).
    potential : Potential, optional
        The potential to sample (default ``Potential(post)``); ``wbic`` passes one with
        its own nβ, γ and a prior centred at 0.
    vectorize : {"auto", True, False}
        Vectorize chains with ``vmap`` ("auto": fall back to a loop if the network
        cannot be traced by vmap).
    compile : bool
        ``torch.compile`` the vectorized gradient (default False). Compiling takes tens of
        seconds once, then steps of small networks run several times faster; worth it for
        long runs.
    """
    method = _check_method(method)
    step_size = _check_pos("step_size", step_size)
    if batch_size is None:
        batch_size = min(post.n, 256)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(
            f"batch_size must be a positive integer; got {batch_size!r} (n = {post.n})"
        )
    batch_size = int(min(batch_size, post.n))
    if not 0 < friction <= 1:
        raise ValueError(f"friction must lie in (0, 1]; got {friction!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha (RMSProp decay) must lie in (0, 1); got {alpha!r}")
    if potential is None:
        potential = Potential(post)
    elif not isinstance(potential, Potential) or potential.post is not post:
        raise TypeError(
            "potential= must be a condpost.Potential built on this posterior "
            "(Potential(post, nbeta=..., localization=..., anchor=...))"
        )
    nb, gam = potential.nbeta, potential.localization
    pot = _potential_fns(potential, vectorize=vectorize, compile=compile)
    draw_batch = _batch_drawer(post, batch_size)
    streams = _Streams(post.device)
    center = post.center
    eps_ = float(step_size)
    warm_start = int(round(1 / (1 - alpha)))

    def init(chains: int, seed: int | list[int], w0: torch.Tensor | None = None) -> SGMCMCState:
        from .base import chain_seeds

        seeds = chain_seeds(seed, chains) if isinstance(seed, (int, np.integer)) else list(seed)
        if len(seeds) != chains:
            raise ValueError(f"got {len(seeds)} chain seeds for chains={chains}")
        w = center.expand(chains, -1).clone() if w0 is None else w0.clone()
        zeros = torch.zeros_like(w)
        return SGMCMCState(
            w=w,
            rng=chain_generators(seeds, post.device),
            step=0,
            momentum=zeros if method in ("sghmc", "sgnht") else None,
            sq_avg=zeros.clone() if method == "rmsprop_sgld" else None,
            adapt_steps=0,
            adapting=True,
            batch_keys=tuple(int(v) for v in seeds),
            thermostat=(
                torch.full((chains,), float(friction), dtype=w.dtype, device=w.device)
                if method == "sgnht"
                else None
            ),
        )

    sqrt_eps = math.sqrt(eps_)
    sghmc_sd = math.sqrt(2 * friction * eps_)

    def advance(gens, state: SGMCMCState, batch=None, virial: bool = True, potential=True):
        """One step with *live* generators ``gens`` (advanced in place); the returned
        state's ``rng`` field is left as it was (the caller dumps the generators when it
        needs the state). ``virial=False`` / ``potential=False`` skip the virial and the
        potential (``info.virial`` / ``info.potential`` are then None); ``potential="dist2"``
        puts ``‖w_t − w*‖²`` in ``info.potential`` instead (what the driver's divergence
        check needs, one reduction cheaper)."""
        idx = None
        if batch is None:
            XB, YB, idx = draw_batch(gens, state.step, state.batch_keys)
        else:
            XB, YB = batch
        w0 = state.w
        g, u, loss = pot(w0, XB, YB, potential)
        if len(gens) == 1:
            noise = torch.randn(w0.shape, generator=gens[0], dtype=w0.dtype, device=w0.device)
        else:
            noise = torch.empty_like(w0)
            for c, gc in enumerate(gens):
                noise[c].normal_(generator=gc)
        vir = ((w0 - center) * g).sum(-1) if virial else None
        precond = None
        if method == "sgld":
            w = w0.add(g, alpha=-0.5 * eps_).add_(noise, alpha=sqrt_eps)
            new = state._replace(w=w, step=state.step + 1)
        elif method == "rmsprop_sgld":
            sq, t = state.sq_avg, state.adapt_steps
            if state.adapting:
                sq = alpha * sq + (1 - alpha) * g * g
                t = t + 1
            if t <= warm_start:
                # warm start: plain SGLD while V accumulates. At a point with zero gradient
                # (e.g. a deep linear network at the origin) V̂ = 0 would give G = 1/δ.
                precond = torch.ones_like(sq)
            else:
                precond = 1.0 / (eps + (sq / (1 - alpha**t)).sqrt())
            w = w0 - (0.5 * eps_) * precond * g + (eps_ * precond).sqrt() * noise
            new = state._replace(w=w, sq_avg=sq, adapt_steps=t, step=state.step + 1)
        elif method == "sghmc":
            v = (1 - friction) * state.momentum - eps_ * g
            v = v + sghmc_sd * noise
            new = state._replace(w=w0 + v, momentum=v, step=state.step + 1)
        else:  # sgnht
            zeta = state.thermostat
            v = (1 - zeta).unsqueeze(-1) * state.momentum - eps_ * g + sghmc_sd * noise
            # target η/(1 − ζ/2): the stationary ‖v'‖²/d of the discrete friction step at unit
            # temperature (Ding et al.'s η in the h → 0 limit); its fixed point is ζ = a + ηV_g/2
            zeta = zeta + (v * v).mean(-1) - eps_ / (1 - 0.5 * zeta)
            new = state._replace(w=w0 + v, momentum=v, thermostat=zeta, step=state.step + 1)
        info = StepInfo(
            loss=loss,
            potential=u,
            virial=vir,
            grad=g,
            precond=precond,
            batch=(XB, YB),
            index=idx,
        )
        return new, info

    def step(rng_key, state: SGMCMCState, batch=None):
        keys = state.rng if rng_key is None else rng_key
        gens = streams.load(keys)
        new, info = advance(gens, state, batch)
        return new._replace(rng=streams.dump(state.w.shape[0])), info

    def live(state: SGMCMCState):
        """The driver's fast path: ``(step, sync)`` on live generators loaded once from
        ``state.rng`` (``sync`` writes them back into a state). ``step`` computes no virial
        (the driver's recorder does, per window) and reports ``U`` without the constraint
        penalties (a non-finite penalty makes the next weights non-finite)."""
        own = _Streams(post.device)
        gens = own.load(state.rng)
        C = state.w.shape[0]

        def live_step(_key, st: SGMCMCState):
            new, info = advance(gens, st, None, False, "dist2")
            u = info.loss.mul(nb).add_(info.potential, alpha=0.5 * gam)
            return new, info._replace(potential=u, batch=None)

        def sync(st: SGMCMCState) -> SGMCMCState:
            return st._replace(rng=own.dump(C))

        return live_step, sync

    settings = {
        "method": method,
        "step_size": eps_,
        "batch_size": batch_size,
        "friction": float(friction) if method in ("sghmc", "sgnht") else None,
        "rmsprop_alpha": float(alpha) if method == "rmsprop_sgld" else None,
        "rmsprop_eps": float(eps) if method == "rmsprop_sgld" else None,
        "nbeta_used": nb,
        "localization_used": gam,
        "compile": bool(compile),
    }
    return SGMCMCKernel(
        init=init,
        step=step,
        method=method,
        step_size=eps_,
        batch_size=batch_size,
        draw_batch=draw_batch,
        potential_and_grad=pot,
        settings=settings,
        advance=advance,
        live=live,
    )


def sgld(post: LocalPosterior, *, step_size: float, batch_size: int | None = None, **kw):
    """SGLD kernel (Welling & Teh 2011): ``w' = w − (ε/2)∇U_B(w) + √ε ξ``."""
    return make_kernel(post, "sgld", step_size=step_size, batch_size=batch_size, **kw)


def rmsprop_sgld(post: LocalPosterior, *, step_size: float, batch_size: int | None = None, **kw):
    """RMSProp-preconditioned SGLD kernel (Li et al. 2016)."""
    return make_kernel(post, "rmsprop_sgld", step_size=step_size, batch_size=batch_size, **kw)


def sghmc(post: LocalPosterior, *, step_size: float, batch_size: int | None = None, **kw):
    """SGHMC kernel (Chen, Fox & Guestrin 2014)."""
    return make_kernel(post, "sghmc", step_size=step_size, batch_size=batch_size, **kw)


def sgnht(post: LocalPosterior, *, step_size: float, batch_size: int | None = None, **kw):
    """SGNHT kernel (Ding et al. 2014): SGHMC with a per-chain Nosé–Hoover thermostat."""
    return make_kernel(post, "sgnht", step_size=step_size, batch_size=batch_size, **kw)


def _check_method(method: str) -> str:
    m = str(method).lower()
    if m not in METHODS:
        from .._errors import nearest

        raise ValueError(
            f"method={method!r} is not an SG-MCMC method; choose one of {list(METHODS)} "
            f"(nearest: {nearest(m, METHODS, 1)})"
        )
    return m


def _check_pos(name: str, v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a positive number; got {v!r}") from None
    if not (math.isfinite(f) and f > 0):
        raise ValueError(f"{name} must be a positive finite number; got {v!r}")
    return f


class _Recorder:
    """The SG-MCMC per-draw statistics, computed per window of kept draws (the driver's
    recorder protocol, ``condpost.infer.driver``): ``virial`` = ``(w − w*)·∇U_B(w)``,
    ``batch_loss`` = ``L_B(w)`` of the gradient batch, SGNHT's ``thermostat``, the
    constraint defects, the paired loss estimate ``loss`` at every ``loss_every``-th
    draw, and ``loss_full`` at every ``full_loss_every``-th draw."""

    def __init__(
        self,
        post,
        kernel,
        *,
        method,
        loss,
        loss_every,
        loss_batch_size,
        full_loss_every,
        keys,
        defect_names,
    ):
        self.post, self.method = post, method
        self.loss, self.loss_every = loss, int(loss_every)
        self.full_every = None if full_loss_every is None else int(full_loss_every)
        self.defect_names = defect_names
        self.keys = tuple(int(v) for v in keys)
        self.measure = _loss_fn(post, kernel.potential_and_grad.forward)
        self.stream = _IndexStream(post.n, loss_batch_size, post.device, _IndexStream.LOSS)
        # ℓ_i(w*) of every sample, for the w* half of the paired estimators (one full pass)
        self.nll_center = _center_nll(post) if loss in ("independent", "gradient") else None

    def shapes(self) -> dict[str, int]:
        out = {"loss": self.loss_every, "batch_loss": 1}
        if self.method == "sgnht":
            out["thermostat"] = 1
        out.update(dict.fromkeys(self.defect_names, 1))
        if self.full_every:
            out["loss_full"] = self.full_every
        return out

    def select(self, s, state, info):
        idx = info.index if self.loss == "gradient" and s % self.loss_every == 0 else None
        return info.loss, state.thermostat, idx

    def window(self, S, W, sel):
        post, C = self.post, W[0].shape[0]
        # the virial term comes from the driver (Info.grad, in its pass over the draws)
        out = {"batch_loss": (S[0], torch.stack([x[0] for x in sel]))}
        if self.method == "sgnht":
            out["thermostat"] = (S[0], torch.stack([x[1] for x in sel]))
        pos = [i for i, s in enumerate(S) if s % self.loss_every == 0]
        if pos:
            j0 = S[pos[0]] // self.loss_every
            Wm = torch.stack([W[i] for i in pos])  # [J, C, d]
            J = len(pos)
            if self.loss == "full":
                lv = post.evaluate(Wm.reshape(J * C, -1), grad=False)["loss"].view(J, C)
            else:  # paired: L_n(w*) + L_B(w) − L_B(w*) on each measured batch
                if self.loss == "independent":
                    idx = self.stream.rows(self.keys, list(range(j0, j0 + J)))  # [J, C, m]
                    lb = _grouped_loss(
                        post,
                        self.measure,
                        Wm.reshape(J * C, -1),
                        idx.reshape(J * C, -1),
                        min_group=C,
                    ).view(J, C)
                else:  # "gradient": the batch the step at the draw used
                    lb = out["batch_loss"][1][pos]
                    idx = torch.stack([sel[i][2] for i in pos])
                lv = lb - self.nll_center[idx].mean(-1) + post.loss_center
            out["loss"] = (j0, lv)
        if self.full_every:
            pf = [i for i, s in enumerate(S) if s % self.full_every == 0]
            if pf:
                Wf = torch.stack([W[i] for i in pf])
                lf = post.evaluate(Wf.reshape(-1, Wf.shape[-1]), grad=False)["loss"]
                out["loss_full"] = (S[pf[0]] // self.full_every, lf.view(len(pf), C))
        if self.defect_names:
            K = len(W)
            Wd = torch.stack(W).reshape(K * C, -1)
            dv = post.evaluate(Wd, grad=False, loss=False, defects=True)
            for nm in self.defect_names:
                out[nm] = (S[0], dv[nm].reshape(K, C))
        return out


def run_sgmcmc(
    post: LocalPosterior,
    *,
    method: str = "sgld",
    chains: int = 4,
    warmup: int = 1000,
    draws: int = 1000,
    seed: int = 0,
    progress: bool = True,
    step_size: float | None = None,
    batch_size: int | None = None,
    thin: int = 1,
    loss_every: int = 1,
    loss_batch_size: int | None = None,
    full_loss_every: int | None = None,
    loss: str = "independent",
    keep_draws: bool = True,
    store: str | None = None,
    resume: bool = False,
    chunk_draws: int | None = None,
    friction: float = 0.1,
    alpha: float = 0.99,
    eps: float = 1e-8,
    adapt_preconditioner: str = "warmup",
    vectorize: bool | str = "auto",
    compile: bool = False,
    callback: Callable | None = None,
    num_threads: int | None = None,
    potential: Potential | None = None,
    record_losses=None,
    record_every: int = 1,
    chain_ids: list[int] | None = None,
) -> SampleResult:
    """Run vectorized SG-MCMC chains from ``w*`` and return a ``SampleResult``.

    Called by ``LocalPosterior.sample("sgld" | "rmsprop_sgld" | "sghmc" | "sgnht", ...)``.
    The loop, the windowed divergence checks, the store and resume are the torch
    driver's (``condpost.infer.driver.run_chains``); this runner checks the options,
    builds the kernel and the per-draw statistics.

    Parameters
    ----------
    method : {"sgld", "rmsprop_sgld", "sghmc", "sgnht"}
        Update rule (see the module docstring).
    chains, warmup, draws, seed, progress :
        As for ``LocalPosterior.sample``. ``warmup`` steps are burn-in, not kept. Each
        chain takes ``warmup + draws·thin`` steps.
    step_size : float
        Required: ε (SGLD, RMSProp-SGLD) or η (SGHMC). ``calibrate_step_size`` helps pick it.
    batch_size : int, optional
        Gradient minibatch size (default ``min(n, 256)``), drawn with replacement,
        independently per chain and step. The row indices are a pure function of the
        chain's seed and the step; a streamed ``data=`` (a DataLoader or map-style
        dataset) fetches only those rows (docs/data.md). An iterable of batches without
        random access is refused.
    thin : int
        Keep every ``thin``-th state as a draw (default 1).
    loss_every : int
        Measure the per-draw loss (for ``llc``) at every ``loss_every``-th kept draw
        (default 1: every draw). The loss arrays have ``ceil(draws/loss_every)`` entries
        per chain (``ref.loss()``), all measured; use it to save loss evaluations when
        draws are strongly autocorrelated.
    loss : {"independent", "gradient", "full"}
        How each measured draw's ``L_n(w)`` is estimated (docs/theory.md §5.3):

        * ``"independent"`` (default): on a fresh random batch of ``loss_batch_size``
          samples, independent of the gradient batches, *paired* with ``w*`` on the same
          batch: ``L̂(w) = L_n(w*) + L_B'(w) − L_B'(w*)``. Unbiased for ``L_n(w)``; the
          pairing cancels most of the batch noise, and the baseline ``L_n(w*)`` is the
          full-data value, so draws and baseline share one estimator. The loss batches
          come from random streams of their own (measuring never moves the chains), and
          the draws of a window are evaluated together in a few vmapped forward passes,
          so the measurement costs a few per cent of a step even at one chain.
        * ``"gradient"``: the same paired estimator on the batch the next gradient step
          uses at that draw (drawn with replacement, hence also independent of ``w``);
          saves the extra forward pass at ``w``.
        * ``"full"``: full-data ``L_n(w)`` at each measured draw (exact; costly).
    loss_batch_size : int, optional
        Batch size for ``loss="independent"`` (default: ``batch_size``).
    full_loss_every : int, optional
        Also evaluate the full-data ``L_n`` every ``full_loss_every`` kept draws
        (statistic ``"loss_full"``; ``ref.llc(estimator="full")`` uses it).
    keep_draws : bool
        Keep the weights of every draw (default True). With False only the per-draw
        statistics are kept, which is what ``llc()`` needs for large networks.
    store : str or path, optional
        Stream draws and statistics to this directory (created; e.g. ``"run.cpst"``) in
        chunks of ``chunk_draws`` draws, each followed by an atomic checkpoint of the
        sampler state. The returned ``ReferenceClass`` reads the draws from disk
        (``numpy.memmap``).
    resume : bool
        Continue the run in ``store`` from its last checkpoint. The result is identical
        to an uninterrupted run with the same arguments; ``draws`` may be larger than the
        stored run's (extend it).
    friction : float
        SGHMC friction α (default 0.1); SGNHT's injected-noise level and initial thermostat.
    alpha, eps : float
        RMSProp-SGLD decay and stabiliser.
    adapt_preconditioner : {"warmup", "always"}
        RMSProp-SGLD: freeze the preconditioner after warmup (default; the kept chain is
        then a Langevin discretisation with a constant metric) or keep adapting
        (devinterp's behaviour).
    vectorize : {"auto", True, False}
        Vectorize chains with ``torch.func.vmap`` (``"auto"``: fall back to a loop when the
        network cannot be batched). ``False`` runs the chains one at a time through the
        one-chain gradient: each chain then equals a 1-chain run with its seed exactly,
        and large networks, whose gradient arithmetic dominates the step, often run
        faster than under ``vmap`` on a CPU (a 931,680-weight transformer at 16 chains:
        24 ms per chain against 30 ms vectorized).
    compile : bool
        ``torch.compile`` the vectorized gradient (one-off cost of tens of seconds; then
        several times faster steps for small networks).
    callback : callable, optional
        ``callback(state, draw_index)`` after every kept draw; raising interrupts the run
        (the store keeps its last checkpoint).
    num_threads : int, optional
        torch intra-op threads while sampling.
    potential : Potential, optional
        Sample this potential instead of the declaration's (``wbic`` passes one with a
        global prior). Its nβ, γ and centre are recorded in ``settings["global_prior"]``
        when they differ from the declaration's; λ̂ is then refused.
    record_losses : True, "train" or (x, y), optional
        Record the per-sample losses ``ℓ_i(w)`` of the training data (True) or of a
        query set at every ``record_every``-th kept draw, batched over chains and, with
        ``store=``, streamed to the store (``ref.records["losses"]``, read by
        ``ref.influence`` and ``ref.susceptibility``; ``condpost.infer.record``).
    record_every : int
        Thinning of the recorded losses (default 1: every kept draw).
    chain_ids : list of int, optional
        Run only these chains of the run with ``max(chain_ids) + 1`` chains (default:
        chains ``0 … chains−1``). Chain ``c`` gets the seed and data stream it would have
        in the full run, so chain groups run apart (other processes, other devices)
        reproduce the full run's chains exactly; ``chains`` must equal
        ``len(chain_ids)``.
    """
    from .driver import _loss_recorders, run_chains

    method = _check_method(method)
    if step_size is None:
        raise TypeError(
            f"{method} needs step_size=... (no default: it depends on the network and nβ). "
            f"Run condpost.calibrate_step_size(post, method={method!r}) to choose one; "
            f"devinterp's examples use 1e-5 … 1e-3."
        )
    for arg, v in (("thin", thin), ("loss_every", loss_every)):
        if int(v) != v or v < 1:
            raise ValueError(f"{arg} must be an integer ≥ 1; got {v!r}")
    if full_loss_every is not None and (
        int(full_loss_every) != full_loss_every or full_loss_every < 1
    ):
        raise ValueError(f"full_loss_every must be None or an integer ≥ 1; got {full_loss_every!r}")
    if loss not in ("independent", "gradient", "full"):
        raise ValueError(f"loss={loss!r}: choose 'independent', 'gradient' or 'full'")
    if adapt_preconditioner not in ("warmup", "always"):
        raise ValueError(
            f"adapt_preconditioner={adapt_preconditioner!r}: choose 'warmup' or 'always'"
        )
    if resume and store is None:
        raise ValueError("resume=True needs store=<path> of the interrupted run")
    thin, loss_every = int(thin), int(loss_every)
    kernel = make_kernel(
        post,
        method,
        step_size=step_size,
        batch_size=batch_size,
        friction=friction,
        alpha=alpha,
        eps=eps,
        potential=potential,
        vectorize=vectorize,
        compile=compile,
    )
    if loss_batch_size is None:
        loss_batch_size = kernel.batch_size
    if int(loss_batch_size) != loss_batch_size or loss_batch_size < 1:
        raise ValueError(f"loss_batch_size must be a positive integer; got {loss_batch_size!r}")
    loss_batch_size = int(min(loss_batch_size, post.n))
    if loss == "independent" and loss_batch_size >= post.n:
        loss = "full"

    from .base import chain_seeds

    if chain_ids is None:
        seeds = chain_seeds(seed, chains)
    else:
        ids = [int(c) for c in chain_ids]
        if len(ids) != chains or len(set(ids)) != len(ids) or min(ids, default=0) < 0:
            raise ValueError(
                f"chain_ids must be {chains} distinct non-negative chain indices (chains="
                f"{chains}); got {chain_ids!r}"
            )
        every = chain_seeds(seed, max(ids) + 1)
        seeds = [every[c] for c in ids]
    settings: dict[str, Any] = {
        "method": method,
        "backend": "torch",
        "chains": chains,
        "warmup": warmup,
        "draws": draws,
        "thin": thin,
        "seed": seed,
        "chain_seeds": seeds,
        **kernel.settings,
        "loss_estimator": loss,
        "loss_every": loss_every,
        "loss_batch_size": loss_batch_size if loss != "full" else post.n,
        "full_loss_every": full_loss_every,
        "baseline": "full data L_n(w*)",
        "baseline_stderr": 0.0,
        "adapt_preconditioner": adapt_preconditioner if method == "rmsprop_sgld" else None,
        "keep_draws": bool(keep_draws),
        "num_threads": num_threads,
        **({"chain_ids": [int(c) for c in chain_ids]} if chain_ids is not None else {}),
    }
    blowup = None
    if potential is not None and potential.global_prior:
        settings["global_prior"] = {
            "nbeta": potential.nbeta,
            "localization": potential.localization,
            "prior_scale": potential.localization**-0.5,
            "centre_norm": float(potential.anchor.norm()),
        }
        blowup = float("inf")  # a global prior: no bound around w* (else the driver's 10⁴·d/γ)
    identity_keys = (
        "method", "chains", "warmup", "thin", "seed", "step_size", "batch_size", "friction",
        "rmsprop_alpha", "rmsprop_eps", "nbeta_used", "localization_used", "loss_estimator",
        "loss_every", "loss_batch_size", "full_loss_every", "adapt_preconditioner",
        "keep_draws",
    )  # fmt: skip
    identity = {k: settings[k] for k in identity_keys}
    if chain_ids is not None:
        identity["chain_ids"] = settings["chain_ids"]

    defect_names: list[str] = []
    if post.constraints:
        with torch.no_grad():
            v0 = post.view(post.center)
            defect_names = [f"defect/{b.name}" for b in post.constraints]
            defect_names += [f"exact/{b.name}/{k}" for b in post.constraints for k in b.exact(v0)]
    recorder = _Recorder(
        post,
        kernel,
        method=method,
        loss=loss,
        loss_every=loss_every,
        loss_batch_size=loss_batch_size,
        full_loss_every=full_loss_every,
        keys=seeds,
        defect_names=defect_names,
    )

    freeze = None
    if method == "rmsprop_sgld" and adapt_preconditioner == "warmup":

        def freeze(state):
            return state._replace(adapting=False)

    def finalize(s: dict) -> None:
        s["vectorized"] = kernel.potential_and_grad.vectorized() and chains > 1
        s["gradient_evaluations"] = (warmup + draws * thin) * chains

    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        result = run_chains(
            post,
            kernel,
            lambda: kernel.init(chains, seeds),
            method=method,
            chains=chains,
            warmup=warmup,
            draws=draws,
            thin=thin,
            progress=progress,
            recorders=(recorder, *_loss_recorders(post, record_losses, record_every)),
            keep_draws=keep_draws,
            store=store,
            resume=resume,
            identity=identity,
            settings=settings,
            chunk_draws=chunk_draws,
            callback=callback,
            freeze=freeze,
            blowup=blowup,
            step_size=kernel.step_size,
            finalize=finalize,
        )
    finally:
        torch.set_num_threads(prev_threads)
    return result


def _np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype
