"""The one torch driver (``condpost.infer.driver.run_chains``): every torch kernel gets
thinning, windows, faults, store and resume from it, a user's kernel included.

Ground truth: the linear-Gaussian posterior N(μ, Σ) in closed form (docs/theory.md §4.1),
and bit-for-bit equality of an interrupted-and-resumed run with an uninterrupted one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem

import condpost as cp
from condpost._errors import SamplerWarning
from condpost.infer import registry


def _post(prob):
    return cp.LocalPosterior(
        linear_net(prob),
        data=(prob.X, prob.Y),
        likelihood=cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )


class RWMState(NamedTuple):
    w: torch.Tensor  # [C, d]
    u: torch.Tensor  # [C]
    t: int
    scale: float
    adapting: bool
    seeds: tuple  # of ints: a tuple field the checkpoint must carry


class RWMInfo(NamedTuple):
    accept_prob: torch.Tensor
    potential: torch.Tensor


class RWM:
    """Random-walk Metropolis written against the contract in a user's file: the driver
    and the registry are all it needs."""

    def __init__(self, post, *, scale=0.05):
        from condpost.potential import Potential

        self.pot = Potential(post)
        self.scale0 = float(scale)
        self.settings = {"scale": self.scale0}

    def init(self, w, key):
        return RWMState(w, self.pot.value(w), 0, self.scale0, True, (int(key) % 97, 3))

    def step(self, key, state, batch=None):
        g = torch.Generator().manual_seed(int(key))
        prop = state.w + state.scale * torch.randn(state.w.shape, generator=g, dtype=state.w.dtype)
        up = self.pot.value(prop)
        acc = torch.exp(torch.clamp(state.u - up, max=0.0))
        ok = torch.rand(acc.shape, generator=g, dtype=acc.dtype) < acc
        w = torch.where(ok[:, None], prop, state.w)
        u = torch.where(ok, up, state.u)
        scale = state.scale
        if state.adapting:  # crude Robbins–Monro towards acceptance 0.3
            scale = scale * float(np.exp(0.05 * (float(acc.mean()) - 0.3)))
        new = state._replace(w=w, u=u, t=state.t + 1, scale=scale)
        return new, RWMInfo(accept_prob=acc, potential=state.u)

    def freeze(self, state):
        return state._replace(adapting=False)


registry.register_kernel("rwm_test", RWM)


def test_user_kernel_samples_the_closed_form_and_resumes_exactly(tmp_path):
    prob = make_problem(seed=2, perturb=0.05)
    post = _post(prob)
    kw = dict(chains=8, warmup=300, draws=1500, thin=2, seed=4, progress=False)
    ref = post.sample("rwm_test", **kw)
    mu, Sigma = prob.posterior()
    W = ref.flat()  # [C, S, d]
    # chain-means standard error (8 chains, autocorrelation included)
    cm = W.mean(1)
    se = cm.std(0, ddof=1) / np.sqrt(cm.shape[0])
    z = (W.reshape(-1, prob.d).mean(0) - mu) / se
    assert np.abs(z).max() < 4.5, z
    assert 0.15 < ref.stat("sampler/accept_prob").mean() < 0.5
    assert ref.stat("dist2").shape == (8, 1500)

    # interrupted at draw 700 (checkpoints every 100 draws), then resumed, then extended
    path = tmp_path / "rwm.cpst"

    def stop(state, s):
        if s == 700:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        post.sample("rwm_test", **kw, store=path, chunk_draws=100, callback=stop)
    part = post.sample("rwm_test", **{**kw, "draws": 1000}, store=path, resume=True)
    np.testing.assert_array_equal(part.flat(), W[:, :1000])
    full = post.sample("rwm_test", **kw, store=path, resume=True, chunk_draws=100)
    np.testing.assert_array_equal(full.flat(), W)
    np.testing.assert_array_equal(full.stat("sampler/accept_prob"), ref.stat("sampler/accept_prob"))


def test_mala_store_resume_is_bit_for_bit(tmp_path):
    prob = make_problem(seed=1)
    post = _post(prob)
    kw = dict(chains=3, warmup=120, draws=90, seed=7, progress=False)
    ref = post.sample("mala", **kw)
    path = tmp_path / "mala.cpst"

    def stop(state, s):
        if s == 50:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        post.sample("mala", **kw, store=path, chunk_draws=20, callback=stop)
    again = post.sample("mala", **kw, store=path, resume=True, chunk_draws=20)
    np.testing.assert_array_equal(again.flat(), ref.flat())
    for k in ("sampler/accept_prob", "sampler/step_size", "dist2"):
        np.testing.assert_array_equal(again.stat(k), ref.stat(k))


def _unstable_step(prob):
    """An SGLD step with ε·k_max/2 = 2.3: the top mode grows by 1.3 per step."""
    mu, Sigma = prob.posterior()
    k_max = float(np.linalg.eigvalsh(np.linalg.inv(Sigma)).max())
    return 4.6 / k_max


@pytest.mark.parametrize("with_store", [False, True])
def test_a_fault_keeps_the_draws_before_it(tmp_path, with_store):
    prob = make_problem(seed=3)
    post = _post(prob)
    eps = _unstable_step(prob)
    kw = dict(chains=2, warmup=0, draws=400, step_size=eps, batch_size=prob.n, progress=False)
    if with_store:
        kw.update(store=tmp_path / "f.cpst", chunk_draws=10)
    with pytest.warns(SamplerWarning, match="completed before it are kept"):
        ref = post.sample("sgld", **kw)
    s = ref.settings
    assert "diverged" in s["fault"] and s["draws_requested"] == 400
    good = s["draws"]
    assert 0 < good < 400
    W = ref.flat()
    assert W.shape[1] == good and np.isfinite(W).all()
    blowup = 1e4 * prob.d / prob.gamma
    assert (((W - prob.w_star) ** 2).sum(-1) <= blowup).all()
    assert ref.stat("loss").shape == (2, good)
    if with_store:
        assert good % 10 == 0  # up to the last checkpoint


def test_a_run_that_faults_before_any_draw_raises():
    prob = make_problem(seed=3)
    post = _post(prob)
    with pytest.raises(FloatingPointError, match="No draw was completed"):
        post.sample(
            "sgld",
            chains=2,
            warmup=300,
            draws=5,
            step_size=_unstable_step(prob),
            batch_size=prob.n,
            progress=False,
        )
