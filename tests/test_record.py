"""Per-sample losses recorded along the chains (``record_losses=``), against the values
evaluated afterwards, across store and resume, and against closed forms.

Ground truth: ``ℓ_i(w)`` is quadratic in ``w`` for a linear-Gaussian model, so its
posterior covariances have closed forms (tests/test_influence.py derives them). For
full-batch SGLD on a Gaussian target N(μ, Σ) with precision A = Σ⁻¹ the stationary law of
``w' = w − (ε/2)A(w − μ) + √ε ξ`` is N(μ, S_ε) with ``S_ε = (A − εA²/4)⁻¹`` (the discrete
Lyapunov equation S = (I − εA/2) S (I − εA/2) + εI), so the SGLD draws' BIF is the
closed form at S_ε, and its bias relative to the exact posterior is known.
"""

from __future__ import annotations

import numpy as np
import pytest
from analytic import linear_net, make_problem

import condpost as cp
from condpost.store import open_store


def _declare(prob):
    return cp.LocalPosterior(
        linear_net(prob),
        data=(prob.X, prob.Y),
        likelihood=cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )


def closed_form(prob, mu, Sigma):
    """Cov(ℓ_i, ℓ_j) [n, n] and ∇ℓ_i(μ) [n, d] for w ~ N(μ, Sigma) (Isserlis)."""
    X, Y = prob.X.numpy(), prob.Y.numpy()
    Phi = np.stack([np.kron(np.eye(prob.k), x[None, :]) for x in X])  # [n, k, d]
    H = np.einsum("nkd,nke->nde", Phi, Phi) / prob.s**2
    g = -np.einsum("nkd,nk->nd", Phi, Y - np.einsum("nkd,d->nk", Phi, mu)) / prob.s**2
    HS = H @ Sigma
    return 0.5 * np.einsum("iab,jba->ij", HS, HS) + g @ Sigma @ g.T, g


@pytest.fixture(scope="module")
def problem():
    prob = make_problem(n=40, din=3, k=2, s=0.5, seed=4, perturb=0.05)
    return prob, _declare(prob)


def _gaussian_nll(prob, W, X, Y):
    """ℓ_i(w) of the linear-Gaussian model by hand (NumPy): W [C, S, d] → [C, S, q]."""
    C, S = W.shape[:2]
    pred = np.einsum("csod,nd->csno", W.reshape(C, S, prob.k, prob.din), X)
    const = prob.k * (np.log(prob.s) + 0.5 * np.log(2 * np.pi))
    return ((Y - pred) ** 2).sum(-1) / (2 * prob.s**2) + const


def test_recorded_equal_evaluated_afterwards(problem):
    prob, post = problem
    ref = post.sample(
        "sgld",
        chains=3,
        warmup=50,
        draws=40,
        step_size=1e-3,
        seed=1,
        record_losses=True,
        record_every=2,
        progress=False,
    )
    rec = ref.records["losses"]
    assert rec.shape == (3, 20, prob.n)
    assert ref.settings["record_losses"] == {
        "every": 2,
        "q": prob.n,
        "query": "train",
        "dtype": "float64",
    }
    # the recorded draws are every 2nd kept draw; ℓ_i by hand at them
    X, Y = prob.X.numpy(), prob.Y.numpy()
    np.testing.assert_allclose(rec, _gaussian_nll(prob, ref.flat()[:, ::2], X, Y), rtol=1e-10)
    # a query set of its own, on a registered kernel
    q = (prob.X[:7] + 0.1, prob.Y[:7])
    ref2 = post.sample(
        "mala", chains=2, warmup=60, draws=12, seed=2, record_losses=q, progress=False
    )
    expect = _gaussian_nll(prob, ref2.flat(), q[0].numpy(), q[1].numpy())
    np.testing.assert_allclose(ref2.records["losses"], expect, rtol=1e-10)


def test_recorded_survive_store_resume_without_draws(problem, tmp_path):
    prob, post = problem
    kw = dict(
        chains=2,
        warmup=40,
        draws=60,
        step_size=1e-3,
        seed=5,
        record_losses=True,
        keep_draws=False,
        progress=False,
    )
    mem = post.sample("sgld", **kw)
    path = tmp_path / "rec.cpst"

    def stop(state, s):
        if s == 33:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        post.sample("sgld", **kw, store=path, chunk_draws=10, callback=stop)
    part = open_store(path)
    np.testing.assert_array_equal(part.records["losses"], mem.records["losses"][:, :30])
    with pytest.raises(ValueError, match="record"):  # a different recording is refused
        post.sample("sgld", **{**kw, "record_losses": (prob.X[:3], prob.Y[:3])}, store=path,
                    resume=True)  # fmt: skip
    done = post.sample("sgld", **kw, store=path, resume=True, chunk_draws=10)
    np.testing.assert_array_equal(done.records["losses"], mem.records["losses"])
    again = open_store(path, posterior=post)
    np.testing.assert_array_equal(again.records["losses"], mem.records["losses"])
    # the BIF needs no kept draws when the losses were recorded
    a = again.influence(observable="loss")
    b = mem.influence(observable="loss")
    np.testing.assert_allclose(a.cov, b.cov, rtol=1e-12)
    # and they round-trip through save/load
    f = mem.save(tmp_path / "rec.npz")
    np.testing.assert_array_equal(
        cp.ReferenceClass.load(f).records["losses"], mem.records["losses"]
    )


def _z_against(inf, truth):
    iu = np.triu_indices(truth.shape[0])
    return ((inf.cov - truth) / inf.stderr)[iu]


def test_recorded_bif_matches_closed_form_mala_and_sgld(problem):
    """MALA (exact) against N(μ, Σ); full-batch SGLD against its own stationary law
    N(μ, S_ε), with its bias against the exact posterior stated."""
    prob, post = problem
    mu, Sigma = prob.posterior()
    pick = np.arange(0, prob.n, 5)
    q = (prob.X[pick], prob.Y[pick])
    truth, _ = closed_form(prob, mu, Sigma)
    truth = truth[np.ix_(pick, pick)]
    mala = post.sample(
        "mala",
        chains=8,
        warmup=400,
        draws=2500,
        thin=2,
        seed=3,
        record_losses=q,
        keep_draws=False,
        progress=False,
    )
    z = _z_against(mala.influence("recorded"), truth)
    assert np.abs(z).max() <= 4.0, np.round(z, 2)

    A = np.linalg.inv(Sigma)
    eps = 0.4 / np.linalg.eigvalsh(A).max()  # ε·λ_max/4 = 10%: a visible bias
    S_eps = np.linalg.inv(A - eps * A @ A / 4)
    truth_eps = closed_form(prob, mu, S_eps)[0][np.ix_(pick, pick)]
    sgld = post.sample(
        "sgld",
        chains=8,
        warmup=500,
        draws=4000,
        step_size=eps,
        batch_size=prob.n,
        seed=4,
        record_losses=q,
        keep_draws=False,
        progress=False,
    )
    inf = sgld.influence("recorded")
    z_eps = _z_against(inf, truth_eps)
    assert np.abs(z_eps).max() <= 4.0, np.round(z_eps, 2)
    # the bias is real and of the predicted size: the diagonal Var(ℓ_i) is inflated
    bias = np.diag(truth_eps) / np.diag(truth) - 1
    assert 0.05 < bias.mean() < 0.4, bias
    z_exact = _z_against(inf, truth)
    assert np.abs(z_exact).max() > 4.0  # the exact posterior's values are rejected
