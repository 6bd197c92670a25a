"""docs/theory.md §4.2's non-Gaussian regular check: logistic regression (Bernoulli and Categorical paths).

For a regular model at large nβ the local posterior is nearly Gaussian with precision
nβ·H + γI (H: Hessian of L_n at the MLE, computed here in closed form with NumPy), so
E[λ̂] ≈ ½ Σ_k a_k/(a_k + γ) with a_k = eig(nβ·H). The residual non-Gaussian bias is
O(1/√(nβ)); we allow 4 MC standard errors plus 3% for it.
"""

import math

import arviz as az
import numpy as np
import pytest
import torch

import condpost as cp


def _fit_logistic(X, y):
    w = np.zeros(X.shape[1])
    for _ in range(50):  # Newton
        p = 1 / (1 + np.exp(-X @ w))
        g = X.T @ (p - y) / len(y)
        H = (X * (p * (1 - p))[:, None]).T @ X / len(y)
        w = w - np.linalg.solve(H, g)
    p = 1 / (1 + np.exp(-X @ w))
    H = (X * (p * (1 - p))[:, None]).T @ X / len(y)
    return w, H


@pytest.mark.parametrize("path", ["bernoulli", "categorical"])
def test_logistic_llc_close_to_laplace_value(path):
    rng = np.random.default_rng(0)
    n, din = 4000, 3
    X = rng.standard_normal((n, din))
    y = (rng.random(n) < 1 / (1 + np.exp(-X @ np.array([1.0, -0.5, 0.25])))).astype(float)
    w_hat, H = _fit_logistic(X, y)
    nbeta, gamma = n / math.log(n), 0.5
    a = np.linalg.eigvalsh(nbeta * H)
    exact = 0.5 * np.sum(a / (a + gamma))
    xt = torch.as_tensor(X)
    if path == "bernoulli":
        net = torch.nn.Linear(din, 1, bias=False).double()
        with torch.no_grad():
            net.weight.copy_(torch.as_tensor(w_hat)[None])
        data, lik = (xt, torch.as_tensor(y)[:, None]), cp.Bernoulli()
        d = din
    else:  # the same model as a 2-class softmax with the first logit fixed at 0 (frozen)
        net = torch.nn.Linear(din, 2, bias=False).double()
        with torch.no_grad():
            net.weight.zero_()
            net.weight[1] = torch.as_tensor(w_hat)
        data, lik = (xt, torch.as_tensor(y).long()), cp.Categorical()
        d = din

    post_kw = dict(nbeta=nbeta, localization=gamma)
    if path == "categorical":
        # both logit rows are lifted: the over-parametrised model has Hessian [[H, −H], [−H, H]]
        # and its row-shift direction is confined by γ alone
        Hfull = np.kron(np.array([[1.0, -1.0], [-1.0, 1.0]]), H) / 1.0
        a_full = np.linalg.eigvalsh(nbeta * Hfull)
        exact = 0.5 * np.sum(a_full / (a_full + gamma))
        d = 2 * din
    post = cp.LocalPosterior(net, data, lik, **post_kw)
    assert post.d == d
    ref = post.sample(
        "nuts",
        chains=2,
        warmup=300,
        draws=800,
        seed=0,
        progress=False,
        dense_mass=(path == "categorical"),
    )
    per = post.nbeta * (ref.loss() - post.loss_center)
    se = per.std() / math.sqrt(float(az.ess(per, method="mean")))
    lam = ref.llc(warn_user=False).mean
    assert abs(lam - exact) <= 4 * se + 0.03 * exact, (lam, exact, se)
