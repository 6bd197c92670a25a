"""Bayesian influence functions and susceptibilities against the linear-Gaussian closed form.

On a bias-free ``nn.Linear`` with a ``Gaussian(scale=s)`` likelihood the posterior is
exactly N(μ, Σ) (tests/analytic.py) and each per-sample loss is quadratic in w:

    ℓ_i(w) = ‖y_i − Φ_i w‖²/(2s²) + const = ½ wᵀH_i w − h_iᵀw + c,  H_i = Φ_iᵀΦ_i/s²,

with Φ_i = I_k ⊗ x_iᵀ. For w ~ N(μ, Σ) two quadratic forms have

    Cov(ℓ_i, ℓ_j) = ½ tr(H_i Σ H_j Σ) + g_iᵀ Σ g_j,   g_i = ∇ℓ_i(μ) = −Φ_iᵀ(y_i − Φ_i μ)/s²,

(for one output this is (2(b_iᵀΣb_j)² + 4 m_i m_j b_iᵀΣb_j)/(4s⁴) with ℓ_i = (a_i + b_iᵀw)²/(2s²)),
and a linear observable O = cᵀw has Cov(O, ℓ_i) = cᵀΣ g_i (third central moments vanish).
Nothing below uses condpost to compute the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem

import condpost as cp
from condpost.influence import cov_with_stderr, per_sample_losses


# --------------------------------------------------------------------------- closed form
def _phi(prob, i):
    return np.kron(np.eye(prob.k), prob.X.numpy()[i][None, :])  # [k, d]


def closed_form(prob):
    """Exact Cov(ℓ_i, ℓ_j) [n, n] and the gradients g_i [n, d] at μ."""
    mu, Sigma = prob.posterior()
    Y = prob.Y.numpy()
    n = prob.n
    Phi = np.stack([_phi(prob, i) for i in range(n)])  # [n, k, d]
    H = np.einsum("nkd,nke->nde", Phi, Phi) / prob.s**2  # [n, d, d]
    r = Y - np.einsum("nkd,d->nk", Phi, mu)
    g = -np.einsum("nkd,nk->nd", Phi, r) / prob.s**2  # [n, d]
    HS = H @ Sigma  # [n, d, d]
    tr = np.einsum("iab,jba->ij", HS, HS)
    cov = 0.5 * tr + g @ Sigma @ g.T
    return cov, g


def _declare(prob):
    net = linear_net(prob)
    return cp.LocalPosterior(
        net,
        data=(prob.X, prob.Y),
        likelihood=cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )


def _exact_ref(prob, post, chains=4, draws=2000, seed=0):
    mu, Sigma = prob.posterior()
    rng = np.random.default_rng(seed)
    W = rng.multivariate_normal(mu, Sigma, size=(chains, draws))
    return cp.ReferenceClass.from_draws(post, torch.as_tensor(W), settings={"method": "exact"})


@pytest.fixture(scope="module")
def problem():
    prob = make_problem(n=40, din=3, k=2, s=0.5, seed=4, perturb=0.05)
    return prob, _declare(prob)


# --------------------------------------------------------------------------- tests
def test_closed_form_agrees_with_scalar_formula():
    """The matrix formula against the one-output formula of quadratic forms."""
    prob = make_problem(n=6, din=3, k=1, s=0.7, seed=2, perturb=0.1)
    mu, Sigma = prob.posterior()
    cov, _ = closed_form(prob)
    X, Y = prob.X.numpy(), prob.Y.numpy()[:, 0]
    # ℓ_i = (a_i + b_iᵀw)²/(2s²), a_i = y_i, b_i = −x_i
    m = Y - X @ mu
    B = X @ Sigma @ X.T
    ref = (2 * B**2 + 4 * np.outer(m, m) * B) / (4 * prob.s**4)
    np.testing.assert_allclose(cov, ref, rtol=1e-10, atol=1e-14)


def test_per_sample_losses_match_numpy(problem):
    prob, post = problem
    ref = _exact_ref(prob, post, chains=2, draws=50)
    L = per_sample_losses(ref, chunk=7)
    assert L.shape == (2, 50, prob.n) and L.dtype == np.float64
    W = ref.flat()
    X, Y = prob.X.numpy(), prob.Y.numpy()
    pred = np.einsum("csod,nd->csno", W.reshape(2, 50, prob.k, prob.din), X)
    const = prob.k * (np.log(prob.s) + 0.5 * np.log(2 * np.pi))
    expect = ((Y - pred) ** 2).sum(-1) / (2 * prob.s**2) + const
    np.testing.assert_allclose(L, expect, rtol=1e-10)
    # L_n is their mean
    np.testing.assert_allclose(L.mean(-1), ref.loss(), rtol=1e-10)
    # a query set and thinning
    Lq = per_sample_losses(ref, (prob.X[:5], prob.Y[:5]), max_draws=20)
    assert Lq.shape == (2, 10, 5)
    np.testing.assert_allclose(Lq, L[:, np.unique(np.linspace(0, 49, 10).round().astype(int)), :5])


def _check_against_truth(prob, ref, label, zmax=4.0):
    truth, g = closed_form(prob)
    mu, Sigma = prob.posterior()
    pick = np.arange(0, prob.n, 5)  # 8 query samples: 36 distinct entries
    inf = ref.influence((prob.X[pick], prob.Y[pick]))
    assert inf.kind == "matrix" and inf.cov.shape == (len(pick), len(pick))
    iu = np.triu_indices(len(pick))
    z = (inf.cov - truth[np.ix_(pick, pick)])[iu] / inf.stderr[iu]
    assert np.all(np.isfinite(z))
    assert np.abs(z).max() <= zmax, f"{label}: BIF z-scores {np.round(z, 2)}"
    # observable form: a linear observable O = cᵀw (callable of w) and L_n (a statistic)
    c = np.linspace(-1.0, 1.0, prob.d)
    ct = torch.as_tensor(c)
    inf_o = ref.influence(observable=lambda w: (w * ct).sum())
    z_o = (inf_o.cov - g @ Sigma @ c) / inf_o.stderr
    assert np.abs(z_o).max() <= zmax + 0.5, f"{label}: Cov(ℓ_i, cᵀw) z {np.round(z_o, 2)}"
    # susceptibilities of L_n and of cᵀw to two groups of training samples
    groups = {"first": list(range(0, 10)), "odd": list(range(1, prob.n, 2))}
    f = prob.nbeta / prob.n
    chi = ref.susceptibility("loss", groups)
    chi_lin = ref.susceptibility(lambda w: (w * ct).sum(), groups)
    zs = []
    for nm, gi in groups.items():
        exact = -f * truth[:, gi].sum(1).mean()  # Cov(L_n, Σ_g ℓ_i), L_n = mean_j ℓ_j
        zs.append((chi[nm] - exact) / chi.stderr[nm])
        exact_lin = -f * (c @ Sigma @ g[gi].sum(0))
        zs.append((chi_lin[nm] - exact_lin) / chi_lin.stderr[nm])
    assert np.abs(zs).max() <= zmax, f"{label}: susceptibility z-scores {np.round(zs, 2)}"
    return z, z_o, np.array(zs)


def test_bif_and_susceptibility_exact_draws(problem):
    prob, post = problem
    ref = _exact_ref(prob, post, chains=4, draws=2000, seed=1)
    z, z_o, zs = _check_against_truth(prob, ref, "exact draws")
    # independent draws: the z-scores look standard normal (36 + 40 + 4 values)
    allz = np.concatenate([z, z_o, zs])
    assert 0.6 < allz.std() < 1.5, allz.std()


def test_bif_and_susceptibility_nuts(problem):
    prob, post = problem
    ref = post.sample("nuts", chains=4, warmup=300, draws=1500, seed=3, progress=False)
    _check_against_truth(prob, ref, "NUTS")


def test_topk_form_matches_matrix(problem):
    prob, post = problem
    ref = _exact_ref(prob, post, chains=2, draws=300, seed=2)
    full = ref.influence()
    top = ref.influence(matrix=False, k=5)
    assert top.kind == "topk" and top.index.shape == (prob.n, 5)
    for i in range(prob.n):
        j = top.index[i]
        np.testing.assert_allclose(top.cov[i], full.cov[i, j])
        np.testing.assert_allclose(top.stderr[i], full.stderr[i, j])
        assert np.abs(full.cov[i]).max() == pytest.approx(np.abs(top.cov[i, 0]))
    # the matrix is symmetric; the response is −(nβ/n)·cov
    np.testing.assert_allclose(full.cov, full.cov.T, rtol=1e-12)
    np.testing.assert_allclose(full.response, -prob.nbeta / prob.n * full.cov)


def test_stderr_calibration_autocorrelated():
    """Batch-means standard errors on AR(1) chains (ρ = 0.9) of a bivariate Gaussian with
    known covariance: over 300 replicates the z-scores have SD near 1 (i.i.d. formulas
    would give SD ≈ 3 here)."""
    rng = np.random.default_rng(0)
    rho, C, S, R = 0.9, 4, 1000, 300
    L = np.linalg.cholesky(np.array([[1.0, 0.6], [0.6, 2.0]]))
    true = 0.6
    zs = []
    for _ in range(R):
        e = rng.standard_normal((C, S, 2)) @ L.T
        x = np.empty_like(e)
        x[:, 0] = e[:, 0]
        a = np.sqrt(1 - rho**2)
        for t in range(1, S):
            x[:, t] = rho * x[:, t - 1] + a * e[:, t]
        cov, se = cov_with_stderr(x[..., 0], x[..., 1])
        zs.append((cov - true) / se)
    zs = np.array(zs)
    assert 0.85 < zs.std() < 1.3, zs.std()
    assert abs(zs.mean()) < 0.25, zs.mean()


def test_observable_errors(problem):
    prob, post = problem
    ref = _exact_ref(prob, post, chains=2, draws=20)
    with pytest.raises(ValueError, match="no per-draw statistic"):
        ref.influence(observable="defect/nothing")
    with pytest.raises(ValueError, match="shape"):
        ref.susceptibility(np.zeros((3, 3)), {"a": [0]})
    with pytest.raises(IndexError):
        ref.susceptibility("loss", {"a": [prob.n]})
    with pytest.raises(TypeError, match="query"):
        ref.influence(query=prob.X)
