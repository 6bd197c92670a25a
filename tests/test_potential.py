"""The one potential: its minibatch form, the likelihoods' fused batch means, WBIC's prior.

Ground truth: the per-sample NLL written out by hand (Gaussian density, log-softmax),
finite differences of U, and the closed-form localizer.
"""

from __future__ import annotations

import math

import pytest
import torch

import condpost as cp
from condpost.likelihoods import Bernoulli, Categorical, Gaussian
from condpost.potential import Potential


def _by_hand_gaussian(out, y, s):
    r = (y - out).reshape(out.shape[0], -1)
    k = r.shape[1]
    return (
        r.square().sum(-1) / (2 * s * s) + k * (math.log(s) + 0.5 * math.log(2 * math.pi))
    ).mean()


def _by_hand_categorical(out, y):
    lp = out - out.logsumexp(-1, keepdim=True)
    ll = lp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return -ll.reshape(ll.shape[0], -1).sum(-1).mean()


@pytest.mark.parametrize("shape", [(7,), (7, 3), (5, 2, 4)])
def test_gaussian_mean_nll_matches_density(shape):
    g = torch.Generator().manual_seed(0)
    out = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(*shape, generator=g, dtype=torch.float64)
    lik = Gaussian(0.7)
    want = _by_hand_gaussian(out, y, 0.7)
    torch.testing.assert_close(lik.mean_nll(out, y), want, rtol=1e-12, atol=1e-12)
    raw, sc, cst = lik.mean_nll_parts(out, y)
    torch.testing.assert_close(raw * sc + cst, want, rtol=1e-12, atol=1e-12)
    # a tensor scale has no split; the mean still equals the density's
    lt = Gaussian(torch.tensor(0.7, dtype=torch.float64))
    assert lt.mean_nll_parts(out, y) is None
    torch.testing.assert_close(lt.mean_nll(out, y), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(9, 5), (4, 3, 6)])
def test_categorical_mean_nll_matches_log_softmax(shape):
    g = torch.Generator().manual_seed(1)
    out = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    lik = Categorical()
    want = _by_hand_categorical(out, y)
    torch.testing.assert_close(lik.mean_nll(out, y), want, rtol=1e-12, atol=1e-12)
    raw, sc, cst = lik.mean_nll_parts(out, y)
    torch.testing.assert_close(raw * sc + cst, want, rtol=1e-12, atol=1e-12)


def test_default_mean_nll_is_the_mean_of_nll():
    g = torch.Generator().manual_seed(2)
    out = torch.randn(11, 1, generator=g, dtype=torch.float64)
    y = (torch.rand(11, 1, generator=g) < 0.5).double()
    lik = Bernoulli()
    p = torch.sigmoid(out)
    want = -(y * p.log() + (1 - y) * (1 - p).log()).sum(-1).mean()
    torch.testing.assert_close(lik.mean_nll(out, y), want, rtol=1e-10, atol=1e-12)
    assert lik.mean_nll_parts(out, y) is None


def _small_post(constraint=False):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x = torch.randn(40, 3)
    y = torch.randn(40, 2)
    post = cp.LocalPosterior(
        net,
        data=(x, y),
        likelihood=cp.Gaussian(0.5),
        localization=3.0,
        dtype=torch.float64,
        check_center=False,
    )
    if constraint:
        post.preserve(cp.Outputs(x[:5], tolerance=0.3))
    return post


@pytest.mark.parametrize("constraint", [False, True])
def test_minibatch_potential_gradient_matches_finite_differences(constraint):
    post = _small_post(constraint)
    pot = Potential(post)
    g = torch.Generator().manual_seed(3)
    w = post.center + 0.1 * torch.randn(post.d, generator=g, dtype=post.dtype)
    idx = torch.randint(0, post.n, (9,), generator=g)
    batch = (post.x[idx], post.y[idx])
    u, grad = pot.value_and_grad(w, batch)
    # the value by hand: nβ·L_B + γ/2‖w − w*‖² + penalties
    out = post.lifted.forward(w, batch[0])
    want = post.nbeta * _by_hand_gaussian(out, batch[1], 0.5)
    want = want + 0.5 * post.localization * (w - post.center).square().sum()
    want = want + sum(b.penalty(post.view(w)) for b in post.constraints)
    torch.testing.assert_close(u, want, rtol=1e-10, atol=1e-10)
    # central differences along 5 random directions
    for _ in range(5):
        v = torch.randn(post.d, generator=g, dtype=post.dtype)
        h = 1e-5
        fd = pot.value_and_grad(w + h * v, batch)[0] - pot.value_and_grad(w - h * v, batch)[0]
        fd = fd / (2 * h)
        assert abs(float(fd - grad @ v)) < 1e-5 * (1 + abs(float(fd)))
    # over chains: one minibatch per chain, equal to the per-chain values
    W = torch.stack([w, post.center])
    XB = torch.stack([batch[0], post.x[:9]])
    YB = torch.stack([batch[1], post.y[:9]])
    U, G = pot.value_and_grad(W, (XB, YB))
    u1, g1 = pot.value_and_grad(post.center, (post.x[:9], post.y[:9]))
    torch.testing.assert_close(U, torch.stack([u, u1]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(G, torch.stack([grad, g1]), rtol=1e-10, atol=1e-10)


def test_full_batch_minibatch_equals_full_data_potential():
    post = _small_post(True)
    pot = Potential(post)
    w = post.center + 0.05
    u_full = pot.value(w)
    u_b, _ = pot.value_and_grad(w, (post.x, post.y))
    torch.testing.assert_close(u_b, u_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(u_full, post.potential(w), rtol=1e-12, atol=1e-12)


def test_global_prior_potential_has_its_own_centre():
    post = _small_post()
    sigma = 2.0
    pot = Potential(
        post,
        nbeta=post.n / math.log(post.n),
        localization=sigma**-2,
        anchor=torch.zeros_like(post.center),
    )
    assert pot.global_prior and not Potential(post).global_prior
    w = post.center.clone()
    want = pot.nbeta * post.loss(w) + 0.5 * w.square().sum() / sigma**2
    torch.testing.assert_close(pot.value(w), want, rtol=1e-12, atol=1e-12)
