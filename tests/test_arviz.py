"""``ReferenceClass.to_arviz``: the log_likelihood group (az.loo / az.waic) and defects."""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem

import condpost as cp


def _exact_draws(prob, chains=2, draws=150, seed=0):
    mu, Sigma = prob.posterior()
    rng = np.random.default_rng(seed)
    return rng.multivariate_normal(mu, Sigma, size=(chains, draws))


def _gaussian_logpdf(prob, W):
    """log N(y_i; W x_i, s² I) per sample, from scratch: [S, n]."""
    X, Y = prob.X.numpy(), prob.Y.numpy()
    out = []
    for w in W:
        r = Y - X @ w.reshape(prob.k, prob.din).T
        out.append(
            -0.5 * (r**2).sum(1) / prob.s**2
            - prob.k * (math.log(prob.s) + 0.5 * math.log(2 * math.pi))
        )
    return np.array(out)


@pytest.fixture(scope="module")
def linear_gaussian():
    prob = make_problem(n=60, din=3, k=2, s=0.5, gamma=1.0, seed=3)
    post = cp.LocalPosterior(
        linear_net(prob),
        data=(prob.X, prob.Y),
        likelihood=cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )
    W = _exact_draws(prob)
    ref = cp.ReferenceClass.from_draws(post, torch.as_tensor(W), settings={"method": "exact"})
    return prob, post, W, ref


def test_log_likelihood_equals_closed_form_gaussian_density(linear_gaussian):
    prob, _, W, ref = linear_gaussian
    idata = ref.to_arviz()
    ll = idata.log_likelihood["y"].values
    assert ll.shape == (2, 150, prob.n)
    exact = _gaussian_logpdf(prob, W.reshape(-1, prob.d)).reshape(ll.shape)
    np.testing.assert_allclose(ll, exact, rtol=1e-10, atol=1e-10)
    # the mean over samples is −L_n at every draw
    np.testing.assert_allclose(-ll.mean(-1), ref.loss(), rtol=1e-10)


def test_waic_and_loo_run(linear_gaussian):
    *_, ref = linear_gaussian
    idata = ref.to_arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ's own Pareto-k / variance notes
        w = az.waic(idata)
        lo = az.loo(idata)
    assert np.isfinite(w.elpd_waic) and np.isfinite(lo.elpd_loo)
    assert w.n_data_points == 60


def test_log_likelihood_off_or_unavailable(linear_gaussian):
    prob, post, _, ref = linear_gaussian
    assert "log_likelihood" not in ref.to_arviz(log_likelihood=False).groups()
    assert "log_likelihood" not in ref.to_arviz(max_values=10).groups()
    back = cp.ReferenceClass(
        ref.flat(), {k: ref.stat(k) for k in ref._stats}, ref.center, ref.config, ref.settings
    )
    assert "log_likelihood" not in back.to_arviz().groups()
    with pytest.raises(RuntimeError, match="not attached"):
        back.to_arviz(log_likelihood=True)


def test_defects_are_sample_stats_and_loo_on_categorical():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    net = net.double()
    post = cp.LocalPosterior(
        net, (x, y), cp.Categorical(), nbeta=5.0, localization=10.0, check_center=False
    )
    post.preserve(cp.Activations("1", x[:5], tolerance=0.1))
    W = post.center + 0.05 * torch.randn(3, 40, post.d, generator=g, dtype=torch.float64)
    ref = cp.ReferenceClass.from_draws(post, W, settings={"method": "test"})
    idata = ref.to_arviz()
    name = post.constraints[0].name
    np.testing.assert_allclose(idata.sample_stats[f"defect[{name}]"].values, ref.defects()[name])
    assert idata.log_likelihood["y"].shape == (3, 40, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        lo = az.loo(idata)
    assert np.isfinite(lo.elpd_loo)
