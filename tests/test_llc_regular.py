"""docs/theory.md §4.2: the regular model's exact finite-γ LLC and the optimisation-gap formula.

Whitened inputs (XᵀX/n = I), s = 1, d = 6, n = 1000, nβ = n/log n: every a_k = nβ, so
E[λ̂] = ½ Σ_k a_k/(a_k + γ) = 3·nβ/(nβ + γ). Tolerance: 4 Monte Carlo standard errors
(from ArviZ's ESS of the per-draw nβΔL, independent of condpost).
"""

import math

import arviz as az
import numpy as np
import pytest
from analytic import linear_net, whitened_problem

import condpost as cp

TABLE = {0.1: 2.9979, 1.0: 2.9794, 10.0: 2.8062, 100.0: 1.7743}  # docs/theory.md §4.2


def _se(x):
    return x.std() / math.sqrt(float(az.ess(x, method="mean")))


def test_table_values_follow_from_formula():
    nb = 1000 / math.log(1000)
    for g, v in TABLE.items():
        assert abs(3 * nb / (nb + g) - v) < 1e-4


@pytest.mark.parametrize("gamma", [1.0, 10.0, 100.0])
def test_llc_matches_exact_finite_gamma(gamma):
    prob = whitened_problem(gamma=gamma, seed=4)
    net = linear_net(prob)
    post = cp.LocalPosterior(
        net, (prob.X, prob.Y), cp.Gaussian(scale=prob.s), localization=gamma
    )  # nbeta defaults to n/log n
    assert post.nbeta == pytest.approx(1000 / math.log(1000))
    ref = post.sample(
        "nuts", chains=4, warmup=300, draws=1000, seed=gamma_seed(gamma), progress=False
    )
    lam = ref.llc(warn_user=False)
    exact = TABLE[gamma]
    assert prob.expected_nbeta_dL() == pytest.approx(exact, abs=1e-4)
    per_draw = post.nbeta * (ref.loss() - post.loss_center)
    se = _se(per_draw)
    assert abs(lam.mean - exact) <= 4 * se, (lam.mean, exact, se)
    assert lam.nbeta == post.nbeta and lam.localization == gamma
    assert lam.std > 0 and len(lam.per_chain) == 4


def gamma_seed(g):
    return int(g * 7) % 97


@pytest.mark.parametrize("shift", [0.02, 0.05])
def test_gap_formula_for_non_minimal_center(shift):
    """E[λ̂] = d/2 − nβ·(L_n(w*) − L_n(ŵ)) as γ → 0; can be negative (docs/theory.md §4.2, §5.4)."""
    prob = whitened_problem(gamma=1e-3, seed=5)
    w_hat = prob.w_star.copy()
    g = np.random.default_rng(0).standard_normal(prob.d)
    prob.w_star = w_hat + shift * g / np.linalg.norm(g)
    gap = prob.nbeta_L(prob.w_star) - prob.nbeta_L(w_hat)  # = nβ·gap
    target = prob.d / 2 - gap
    # the exact finite-γ value differs from the γ→0 formula by < 0.01 here
    assert abs(prob.expected_nbeta_dL() - target) < 0.01
    net = linear_net(prob)
    post = cp.LocalPosterior(
        net, (prob.X, prob.Y), cp.Gaussian(scale=prob.s), localization=1e-3, check_center=False
    )
    ref = post.sample("nuts", chains=4, warmup=300, draws=1000, seed=1, progress=False)
    per_draw = post.nbeta * (ref.loss() - post.loss_center)
    lam = ref.llc(warn_user=False)
    assert abs(lam.mean - target) <= 4 * _se(per_draw) + 0.01, (lam.mean, target)
    if target < 0:
        with pytest.warns(cp.SamplerWarning, match="negative"):
            ref.llc()


def test_center_check_predicts_gap():
    """The centre check's CG estimate of the λ̂ shift equals the exact −nβ·gap (quadratic model)."""
    prob = whitened_problem(gamma=1e-3, seed=5)
    w_hat = prob.w_star.copy()
    prob.w_star = w_hat + 0.15 * np.ones(prob.d) / math.sqrt(prob.d)
    exact_shift = prob.expected_nbeta_dL() - 0.5 * np.trace(prob.A() @ prob.posterior()[1])
    with pytest.warns(cp.CenterWarning, match="not at a minimum"):
        post = cp.LocalPosterior(
            linear_net(prob), (prob.X, prob.Y), cp.Gaussian(scale=prob.s), localization=1e-3
        )
    assert post.center_check["lambda_shift"] == pytest.approx(exact_shift, rel=1e-6)
    assert post.center_check["grad_norm"] == pytest.approx(
        float(np.linalg.norm(prob.grad_at_star())), rel=1e-10
    )
