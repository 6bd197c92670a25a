"""Aoyagi's learning coefficient of deep linear networks and the DLN benchmark helpers.

Ground truth:

* the worked table of docs/theory.md §4.3 (values derived there by hand and checked by NUTS);
* for two layers (reduced-rank regression) the closed forms of Aoyagi & Watanabe (2005),
  "Stochastic complexities of reduced rank regression in Bayesian estimation", Neural
  Networks 18, 924–933, re-implemented here independently of ``benchmarks/_dln.py``;
* one layer is a regular model: λ = d/2;
* a generic teacher of full rank r = min_j H_j: λ = r(H_1 + H_{M+1} − r)/2, half the
  dimension of the manifold of rank-r matrices (docs/theory.md §4.3, caveat 1);
* the plain SGLD loop's exact stationary law on a Gaussian target.
"""

from __future__ import annotations

import itertools
import math
import sys
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _dln import (  # noqa: E402
    aoyagi_admissible_sets,
    aoyagi_lambda,
    aoyagi_rlct,
    compress_data,
    dln_parameter_count,
    make_data,
    make_dln,
    make_teacher,
    plain_sgld,
)

import condpost as cp  # noqa: E402

# docs/theory.md §4.3 worked examples: widths, r, Σ (0-based), λ, m, d
TABLE = [
    ([1, 1, 1], 0, (0, 1, 2), Fraction(1, 2), 2, 2),
    ([5, 3, 5], 0, (0, 1, 2), Fraction(13, 2), 2, 30),
    ([5, 4, 5], 0, (0, 1, 2), Fraction(8), 1, 40),
    ([4, 3, 8], 0, (0, 1), Fraction(6), 1, 36),
    ([4, 2, 8, 4], 1, (0, 1, 3), Fraction(5), 2, 56),
    ([10, 10, 10, 10], 10, (0, 1, 2, 3), Fraction(50), 1, 300),
    ([10, 10, 10, 10], 5, (0, 1, 2, 3), Fraction(46), 3, 300),
    ([10, 10, 10, 10], 0, (0, 1, 2, 3), Fraction(67, 2), 3, 300),
    ([6, 4, 4, 6], 2, (0, 1, 2, 3), Fraction(12), 1, 64),
    ([3, 5, 5, 5, 3], 1, (0, 1, 2, 3, 4), Fraction(9, 2), 1, 80),
]


@pytest.mark.parametrize("widths,r,sigma,lam,m,d", TABLE)
def test_theory_table(widths, r, sigma, lam, m, d):
    assert aoyagi_rlct(widths, r) == (lam, m)
    assert aoyagi_lambda(widths, r) == float(lam)
    assert sigma in aoyagi_admissible_sets(widths, r)
    assert dln_parameter_count(widths) == d


def rrr_closed_form(N: int, H: int, M: int, r: int) -> Fraction:
    """Aoyagi & Watanabe (2005): RRR with input N, hidden H, output M, true rank r."""
    m, h, n = N - r, H - r, M - r
    base = Fraction(r * (N + M - r), 2)
    if m + h < n:
        return base + Fraction(m * h, 2)
    if n + h < m:
        return base + Fraction(h * n, 2)
    if m + n < h:
        return base + Fraction(m * n, 2)
    extra = Fraction(2 * m * n + 2 * h * n + 2 * m * h - m * m - n * n - h * h, 8)
    if (m + h + n) % 2:
        extra += Fraction(1, 8)
    return base + extra


def test_two_layers_match_aoyagi_watanabe_2005():
    count = 0
    for N, H, M in itertools.product(range(1, 9), repeat=3):
        for r in range(min(N, H, M) + 1):
            assert aoyagi_rlct([N, H, M], r)[0] == rrr_closed_form(N, H, M, r), (N, H, M, r)
            count += 1
    assert count == 1808  # as in docs/theory.md §4.3's cross-check


def test_one_layer_is_regular():
    for a, b in itertools.product(range(1, 9), repeat=2):
        for r in range(min(a, b) + 1):
            assert aoyagi_rlct([a, b], r) == (Fraction(a * b, 2), 1)


def test_full_rank_is_half_the_rank_r_manifold_dimension():
    rng = np.random.default_rng(0)
    for _ in range(300):
        widths = [int(v) for v in rng.integers(1, 9, size=rng.integers(2, 6))]
        r = min(widths)
        assert aoyagi_rlct(widths, r)[0] == Fraction(r * (widths[0] + widths[-1] - r), 2)


def test_every_admissible_sigma_gives_the_same_lambda_and_bounds():
    """docs/theory.md §4.3: every admissible Σ gives one λ; and 0 < λ ≤ d/2 (λ is at most regular)."""
    from _dln import _lambda_from_sigma

    rng = np.random.default_rng(1)
    for _ in range(300):
        widths = [int(v) for v in rng.integers(1, 8, size=rng.integers(2, 6))]
        r = int(rng.integers(0, min(widths) + 1))
        lam, m = aoyagi_rlct(widths, r)
        sets = aoyagi_admissible_sets(widths, r)
        assert sets
        for s in sets:
            assert _lambda_from_sigma(widths, r, s)[0] == lam
        assert 0 < lam <= Fraction(dln_parameter_count(widths), 2)
        assert m >= 1


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="rank"):
        aoyagi_lambda([4, 3, 8], 4)
    with pytest.raises(ValueError, match="widths"):
        aoyagi_lambda([4], 0)
    with pytest.raises(ValueError, match="widths"):
        aoyagi_lambda([4, 0, 3], 0)
    with pytest.raises(TypeError, match="widths"):
        aoyagi_lambda(["a", 3], 0)


def test_teachers_and_compressed_data_give_the_same_loss():
    """The 4-row dataset used for the NUTS target has exactly the full data's L_n."""
    widths = [4, 3, 8]
    for kind, r_expected in (("origin", 0), ("full", 3)):
        T, r = make_teacher(widths, kind, seed=0)
        assert r == r_expected
        x, y = make_data(T, 5000, seed=1)
        xc, yc = compress_data(x, T)
        g = torch.Generator().manual_seed(2)
        for _ in range(5):
            Ws = [
                t.double() + 0.5 * torch.randn(t.shape, generator=g, dtype=torch.float64) for t in T
            ]
            net = make_dln(widths, Ws).double().requires_grad_(False)
            full = 0.5 * (net(x.double()) - y.double()).pow(2).sum(-1).mean()
            comp = 0.5 * (net(xc.double()) - yc.double()).pow(2).sum(-1).mean()
            assert float(abs(full - comp)) <= 1e-5 * float(full)


def test_plain_sgld_loop_matches_its_exact_stationary_law():
    """The speed reference is a correct SGLD: exact Euler–Maruyama variance on a Gaussian.

    One-layer model (regular, d = 6), noiseless targets, full batch. With
    ``U = ½ (w−w*)ᵀ P (w−w*)``, ``P = nβ(Σ̂ ⊗ I) + γ I``, the update
    ``w' = w − (ε/2) P (w−w*) + √ε ξ`` has the stationary covariance with eigenvalues
    ``c_k = 1/(p_k (1 − ε p_k / 4))``, so ``E[nβ ΔL] = ½ Σ_k nβ s_k c_k`` exactly (``s_k``
    the eigenvalues of Σ̂ ⊗ I). Tolerance: 4 Monte Carlo standard errors (ESS of the
    trace by ArviZ's rank-normalised bulk ESS).
    """
    from condpost.diagnostics import ess_bulk

    widths, n, nbeta, gamma, eps = [3, 2], 200, 50.0, 1.0, 4e-3
    T, _ = make_teacher(widths, "full", seed=0)
    x, y = make_data(T, n, seed=1)
    net = make_dln(widths, T)
    steps, burn = 4000, 300
    losses = plain_sgld(
        net, x, y, nbeta=nbeta, localization=gamma, step_size=eps, steps=steps, batch_size=n
    )
    trace = nbeta * losses[burn:].double().numpy()  # L_n(w*) = 0: noiseless, w* = teacher
    s = torch.linalg.eigvalsh(x.double().T @ x.double() / n).numpy()
    s = np.repeat(s, widths[1])  # Σ̂ ⊗ I_out
    p = nbeta * s + gamma
    exact = 0.5 * np.sum(nbeta * s / (p * (1 - eps * p / 4)))
    ess = ess_bulk(trace[None, :])
    se = trace.std() / math.sqrt(ess)
    assert abs(trace.mean() - exact) < 4 * se, (trace.mean(), exact, se, ess)
    # the step-size term matters at this ε: the continuous-time value is excluded
    continuous = 0.5 * np.sum(nbeta * s / p)
    assert abs(exact - continuous) > 0.01 * continuous


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["origin", "full"])
def test_draws_auto_llc_within_5_percent_of_nuts(kind):
    """Issue 12: DLN [4, 3, 8], γ = 1, n = 2,000, nβ = n/log n, draws="auto" (rtol 0.02).

    The exact value is NUTS at the same (nβ, γ) on the 4-row dataset with the identical
    loss (``compress_data``). SGLD at a small fixed step ε = 5e-5 (8 chains, warmup 2,000,
    thin 5). Measured (benchmarks/llc_auto.py): origin, NUTS 5.929 ± 0.032, λ̂ 6.025 ±
    0.046 (+1.6%), converged at 16,000 draws (the plateau criterion the last to hold; the
    first 4,000 dropped as still trending); full-rank teacher, NUTS 13.48 ± 0.054, λ̂
    13.66 ± 0.092 (+1.4%), converged at 32,000 draws (the virial criterion last; the
    ‖w − w*‖² plateau needs > 20,000 draws: 9 gauge directions relax only through γ).
    6 and 14 minutes on 2 busy cores.
    """
    from llc_auto import dln_case, nuts_target

    class A:
        nuts_chains, nuts_warmup, nuts_draws = 4, 1000, 4000

    post, post_t, lam_inf, _ = dln_case(kind, [4, 3, 8], 2000, 1.0)
    exact, exact_se, _ = nuts_target(post_t, A)
    from condpost.auto import estimate_llc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cp.SamplerWarning)
        lam = estimate_llc(
            post, step_size=5e-5, chains=8, warmup=2000, thin=5, rtol=0.02, max_draws=40000
        )
    assert lam.run["stop_reason"] == "converged", lam.run
    assert abs(lam.mean - exact) <= 0.05 * exact, (lam.mean, exact, exact_se, lam.run["rounds"])
