"""Deep linear networks for the SG-MCMC benchmarks: Aoyagi's λ, teachers, data, a plain SGLD loop.

Shared by ``benchmarks/sgld_vs_devinterp.py`` and ``tests/test_dln_theory.py``.

Model (docs/theory.md §4.3). ``f(x) = W_M ⋯ W_1 x`` with widths ``H_1`` (input), ``H_2, …, H_M``,
``H_{M+1}`` (output) and ``W_j ∈ R^{H_{j+1} × H_j}``; ``r = rank(W_M ⋯ W_1)`` at the truth.
Its real log canonical threshold (the global learning coefficient λ) and multiplicity
``m`` are given in closed form by Aoyagi:

* M. Aoyagi, "Consideration on the learning efficiency of multiple-layered neural
  networks with linear units", Neural Networks 172 (2024) 106132 (preprint 2023),
  main theorem;
* the two-layer case (reduced-rank regression) is M. Aoyagi and S. Watanabe,
  "Stochastic complexities of reduced rank regression in Bayesian estimation",
  Neural Networks 18 (2005) 924–933;
* the statement used here follows docs/theory.md §4.3 (also implemented in Furman & Lau,
  "Estimating the local learning coefficient at scale", arXiv:2402.03698, ``dln.py``).
  This module is an independent implementation from the formula, not a copy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from fractions import Fraction

import torch
from torch import nn

__all__ = [
    "aoyagi_rlct",
    "aoyagi_lambda",
    "aoyagi_admissible_sets",
    "dln_parameter_count",
    "make_dln",
    "make_teacher",
    "make_data",
    "compress_data",
    "plain_sgld",
]


# --------------------------------------------------------------------------- Aoyagi's λ
def _check_widths(widths: Sequence[int], rank: int) -> tuple[list[int], int]:
    try:
        H = [int(h) for h in widths]
    except (TypeError, ValueError):
        raise TypeError(f"widths must be a sequence of positive integers; got {widths!r}") from None
    if len(H) < 2 or any(h != w for h, w in zip(H, widths, strict=False)) or min(H) < 1:
        raise ValueError(
            f"widths must list at least 2 positive integers [H_1 (input), ..., H_{{M+1}} "
            f"(output)]; got {list(widths)!r}"
        )
    r = int(rank)
    if r != rank or not 0 <= r <= min(H):
        raise ValueError(
            f"rank must be an integer in [0, min(widths)] = [0, {min(H)}] (the rank of the "
            f"product W_M⋯W_1 at the truth); got {rank!r}"
        )
    return H, r


def _admissible(delta: list[int], sigma: Sequence[int]) -> bool:
    """docs/theory.md §4.3 step 2: is the index set ``sigma`` (|Σ| = ℓ+1 ≥ 2) admissible?"""
    ell = len(sigma) - 1
    if ell < 1:
        return False
    inside = [delta[i] for i in sigma]
    outside = [delta[i] for i in range(len(delta)) if i not in set(sigma)]
    S = sum(inside)
    if outside and not max(inside) < min(outside):
        return False
    if not S >= ell * max(inside):
        return False
    if outside and not S < ell * min(outside):
        return False
    return True


def _lambda_from_sigma(H: list[int], r: int, sigma: Sequence[int]) -> tuple[Fraction, int]:
    delta = [h - r for h in H]
    ell = len(sigma) - 1
    S = sum(delta[i] for i in sigma)
    a = S - ell * (S // ell)  # S mod ℓ, in [0, ℓ)
    pair_sum = sum(delta[i] * delta[j] for i, j in itertools.combinations(sigma, 2))
    lam = (
        Fraction(-(r**2) + r * (H[0] + H[-1]), 2)
        + Fraction(a * (ell - a), 4 * ell)
        - Fraction(ell * (ell - 1), 4) * Fraction(S, ell) ** 2
        + Fraction(pair_sum, 2)
    )
    return lam, a * (ell - a) + 1


def aoyagi_admissible_sets(widths: Sequence[int], rank: int = 0) -> list[tuple[int, ...]]:
    """All admissible index sets Σ of docs/theory.md §4.3 (brute force over subsets; 0-based)."""
    H, r = _check_widths(widths, rank)
    delta = [h - r for h in H]
    idx = range(len(H))
    return [
        s
        for k in range(2, len(H) + 1)
        for s in itertools.combinations(idx, k)
        if _admissible(delta, s)
    ]


def aoyagi_rlct(widths: Sequence[int], rank: int = 0) -> tuple[Fraction, int]:
    """Learning coefficient λ (exact, as a ``Fraction``) and multiplicity m of a deep linear network.

    With ``Δ_j = H_j − r`` (``j = 1..M+1``), pick ``Σ ⊆ {1..M+1}``, ``|Σ| = ℓ+1``, ``ℓ ≥ 1``,
    such that ``max_Σ Δ < min_{∉Σ} Δ``, ``Σ_Σ Δ ≥ ℓ·max_Σ Δ`` and ``Σ_Σ Δ < ℓ·min_{∉Σ} Δ``
    (the conditions with ``∉Σ`` are vacuous when Σ is everything). With ``S = Σ_Σ Δ`` and
    ``a = S mod ℓ``:

    .. math::

        \\lambda = \\frac{-r^2 + r(H_1 + H_{M+1})}{2} + \\frac{a(\\ell-a)}{4\\ell}
        - \\frac{\\ell(\\ell-1)}{4}\\Big(\\frac{S}{\\ell}\\Big)^2
        + \\frac12 \\sum_{\\{\\sigma,\\sigma'\\}\\subset\\Sigma} \\Delta_\\sigma\\Delta_{\\sigma'},
        \\qquad m = a(\\ell-a) + 1.

    (Aoyagi 2024; docs/theory.md §4.3.) The first condition forces Σ to be a set of the
    smallest Δs, so the search runs over ``k = 2, …, M+1`` smallest (ties kept together).

    Parameters
    ----------
    widths : sequence of int
        ``[H_1 (input), H_2, …, H_{M+1} (output)]``; two entries is the one-layer
        (regular) model with ``λ = H_1 H_2 / 2``.
    rank : int
        ``r``, the rank of the product ``W_M ⋯ W_1`` at the true parameter (default 0:
        the origin of a realizable zero teacher).

    Returns
    -------
    (Fraction, int)
        ``λ`` and ``m``. ``λ`` is the *global* RLCT; the local value at a particular
        true parameter can be larger, except at the origin with ``r = 0`` and at a
        generic teacher with ``r = min_j H_j`` (docs/theory.md §4.3, caveat 1).
    """
    H, r = _check_widths(widths, rank)
    delta = [h - r for h in H]
    order = sorted(range(len(H)), key=lambda i: delta[i])
    for k in range(2, len(H) + 1):
        if k < len(H) and delta[order[k - 1]] == delta[order[k]]:
            continue  # a tie straddles the cut: max_Σ Δ < min_{∉Σ} Δ fails
        sigma = tuple(sorted(order[:k]))
        if _admissible(delta, sigma):
            return _lambda_from_sigma(H, r, sigma)
    raise RuntimeError(f"no admissible Σ for widths={H}, rank={r}; this contradicts Aoyagi 2024")


def aoyagi_lambda(widths: Sequence[int], rank: int = 0) -> float:
    """Aoyagi's learning coefficient λ of a deep linear network (float); see ``aoyagi_rlct``."""
    return float(aoyagi_rlct(widths, rank)[0])


def dln_parameter_count(widths: Sequence[int]) -> int:
    """``d = Σ_j H_j H_{j+1}`` (bias-free layers)."""
    return sum(a * b for a, b in itertools.pairwise(widths))


# --------------------------------------------------------------------------- networks and data
def make_dln(widths: Sequence[int], weights: Sequence[torch.Tensor] | None = None) -> nn.Sequential:
    """A bias-free deep linear network ``nn.Sequential(Linear(H_1,H_2), …)`` (float32).

    ``weights[j]`` has shape ``[H_{j+2}, H_{j+1}]`` (torch's ``Linear.weight`` layout).
    """
    layers = [nn.Linear(a, b, bias=False) for a, b in itertools.pairwise(widths)]
    net = nn.Sequential(*layers)
    if weights is not None:
        if len(weights) != len(layers):
            raise ValueError(f"weights: expected {len(layers)} matrices, got {len(weights)}")
        with torch.no_grad():
            for lay, w in zip(layers, weights, strict=True):
                if tuple(w.shape) != tuple(lay.weight.shape):
                    raise ValueError(
                        f"weights: shape {tuple(w.shape)} does not match layer "
                        f"{tuple(lay.weight.shape)}"
                    )
                lay.weight.copy_(w)
    return net


def make_teacher(
    widths: Sequence[int], kind: str = "origin", *, seed: int = 0, spread: float = 2.0
) -> tuple[list[torch.Tensor], int]:
    """Teacher weights ``[W_1, …, W_M]`` and the rank ``r`` of their product.

    ``kind="origin"``: all zero (``r = 0``); the local RLCT at 0 equals Aoyagi's global λ
    because ``K`` is homogeneous (docs/theory.md §4.3, caveat 1).

    ``kind="full"``: a generic teacher of full rank ``r = min_j H_j``, where the local
    λ equals ``r(H_1 + H_{M+1} − r)/2``. Each factor is ``U diag(s) Vᵀ`` with
    Haar-random orthogonal ``U, V`` and singular values log-uniform in
    ``[spread^{-1/2}, spread^{1/2}]``: generic (no structure, full rank), but with a
    controlled condition number so that one SGLD step size suits every direction.

    ``kind="rankK"`` (e.g. ``"rank2"``): the same, but the first factor has rank ``K`` so
    that the product has rank ``K`` (the anchor's devinterp run: [5,4,3,4], rank 2). Not a
    safe point of docs/theory.md §4.3: the local λ there need not equal Aoyagi's, so compare
    samplers against the NUTS value at the same (nβ, γ), not against λ.
    """
    H = [int(h) for h in widths]
    if kind == "origin":
        return [torch.zeros(b, a) for a, b in itertools.pairwise(H)], 0
    target_rank = min(H)
    if kind.startswith("rank"):  # a generic teacher whose product has rank K < min(H)
        target_rank = int(kind[4:])
        if not 0 < target_rank <= min(H):
            raise ValueError(f"kind={kind!r}: rank must lie in 1..{min(H)}")
    elif kind != "full":
        raise ValueError(f"kind must be 'origin', 'full' or 'rankK'; got {kind!r}")
    g = torch.Generator().manual_seed(seed)
    Ws = []
    for j, (a, b) in enumerate(itertools.pairwise(H)):
        k = min(a, b) if j else min(a, b, target_rank)  # the first factor carries the rank
        U, _ = torch.linalg.qr(torch.randn(b, b, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(a, a, generator=g, dtype=torch.float64))
        u = torch.rand(k, generator=g, dtype=torch.float64)
        s = spread ** (u - 0.5)
        Ws.append((U[:, :k] * s) @ V[:, :k].T)
    prod = Ws[0]
    for W in Ws[1:]:
        prod = W @ prod
    r = int(torch.linalg.matrix_rank(prod))
    if r != target_rank:
        raise RuntimeError(f"teacher rank {r} != {target_rank}; try another seed")
    return [W.float() for W in Ws], r


def make_data(
    teacher: Sequence[torch.Tensor], n: int, *, seed: int = 0, noise: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x ~ N(0, I)`` (n rows) and ``y = W_M⋯W_1 x + noise·ε`` (noiseless by default).

    Noiseless targets make the teacher an exact minimizer of ``L_n`` (no optimisation gap,
    docs/theory.md §4.2), as in the Furman–Lau protocol.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, teacher[0].shape[1], generator=g)
    y = x
    for W in teacher:
        y = y @ W.T
    if noise:
        y = y + noise * torch.randn(y.shape, generator=g)
    return x, y.contiguous()


def compress_data(
    x: torch.Tensor, teacher: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``H_1``-row dataset with the *same* mean loss function as ``(x, teacher(x))``.

    For noiseless Gaussian targets, ``L_n(w) = ½ tr((P(w) − P*) Σ̂ (P(w) − P*)ᵀ)/s² + c``
    with ``Σ̂ = xᵀx/n`` and ``P`` the end-to-end matrix. Rows ``x_c = √H_1 · Lᵀ`` with
    ``Σ̂ = L Lᵀ`` (Cholesky) give ``x_cᵀ x_c / H_1 = Σ̂``, hence the identical ``L_n``
    (same constant too). Used to run full-batch NUTS on the exact same posterior cheaply.
    """
    xd = x.double()
    sigma = xd.T @ xd / x.shape[0]
    L = torch.linalg.cholesky(sigma)
    xc = math.sqrt(x.shape[1]) * L.T
    yc = xc
    for W in teacher:
        yc = yc @ W.double().T
    return xc.to(x.dtype), yc.to(x.dtype).contiguous()


# --------------------------------------------------------------------------- plain SGLD loop
def plain_sgld(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    nbeta: float,
    localization: float,
    step_size: float,
    steps: int,
    batch_size: int,
    seed: int = 0,
    scale: float = 1.0,
) -> torch.Tensor:
    """The reference a researcher writes by hand: one SGLD chain in plain PyTorch.

    ``Δw = −ε/2 [nβ ∇L_B(w) + γ (w − w*)] + √ε ξ`` (docs/theory.md §1.5), ``L_B`` the minibatch
    mean Gaussian NLL ``Σ_j (y_j − f_j)²/(2s²)`` (constant dropped), batches from an epoch
    permutation of the data. Returns the minibatch loss at each step (``[steps]``, the
    loss of the batch used for the gradient). ``net`` is modified in place (pass a copy).
    """
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    centers = [p.detach().clone() for p in params]
    n = x.shape[0]
    nb = n // batch_size
    losses = torch.empty(steps)
    half, sd = 0.5 * step_size, math.sqrt(step_size)
    inv2s2 = 0.5 / scale**2
    perm = torch.randperm(n, generator=gen)
    for t in range(steps):
        j = t % nb
        if j == 0 and t:
            perm = torch.randperm(n, generator=gen)
        idx = perm[j * batch_size : (j + 1) * batch_size]
        xb, yb = x[idx], y[idx]
        loss = inv2s2 * (net(xb) - yb).pow(2).sum(-1).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, c in zip(params, grads, centers, strict=True):
                drift = nbeta * g + localization * (p - c)
                p.add_(drift, alpha=-half).add_(torch.randn(p.shape, generator=gen), alpha=sd)
            losses[t] = loss.detach()
    return losses
