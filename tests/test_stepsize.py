"""``calibrate_step_size`` always answers, with its reasoning (issue 12, item 4).

Ground truth: docs/theory.md §4.2's regular model, where ``E[λ̂] = ½ Σ a_k/(a_k + γ)`` is
exact (2.9794 at γ = 1; ``d/2 = 3``). The recommended step must give λ̂ within 3% of it in a
run long enough that its MC standard error is a fraction of that band.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from analytic import linear_net, whitened_problem

import condpost as cp
from condpost.stepsize import calibrate_step_size, resolve_step_size, top_curvature


def _regular(gamma=1.0, seed=4):
    prob = whitened_problem(gamma=gamma, seed=seed)
    post = cp.LocalPosterior(
        linear_net(prob), (prob.X, prob.Y), cp.Gaussian(scale=prob.s), localization=gamma
    )
    return prob, post


def _mlp_post(widths, n=200, gamma=1.0, seed=0, train_steps=300):
    """A small tanh regression MLP trained to a minimum (full batch, L-BFGS polish)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(widths[0], widths[-1], generator=g, dtype=torch.float64))
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers[:-1]).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return cp.LocalPosterior(
        net, (x, y), cp.Gaussian(scale=0.3), localization=gamma, check_center=False
    )


def test_top_curvature_is_the_hessian_top_eigenvalue():
    """Regular model: the Hessian of U is A + γI with A = (nβ/s²)·XᵀX/n = nβ·I (whitened)."""
    prob, post = _regular()
    assert top_curvature(post) == pytest.approx(post.nbeta + 1.0, rel=1e-3)


@pytest.mark.parametrize("steps", [20, 21, 37, 500])
def test_any_steps_above_the_minimum_works(steps):
    """⌈steps/2⌉ need not be a multiple of 4 (steps=500 crashed with a reshape error)."""
    _, post = _regular()
    res = calibrate_step_size(
        post,
        "sgld",
        [1e-4, 3e-4, 1e-3],
        chains=2,
        steps=steps,
        batch_size=100,
        progress=False,
        warn_user=False,
    )
    assert isinstance(res.recommended, float) and res.recommended in (1e-4, 3e-4, 1e-3)
    assert len(res.rows) == 3 and res.reasoning
    with pytest.raises(ValueError, match="steps must be an integer ≥ 20"):
        calibrate_step_size(post, "sgld", [1e-4], steps=19, progress=False)


def test_regular_model_recommended_step_gives_llc_within_3_percent():
    """The default ladder (from the curvature) on §4.2's model: the recommended step's
    λ̂ is within 3% of the exact 2.9794 (and of d/2 = 3), and the ε → 0 extrapolation of the
    ladder itself agrees with the exact value within its error."""
    prob, post = _regular()
    exact = prob.expected_nbeta_dL()
    cal = calibrate_step_size(
        post,
        "sgld",
        chains=48,
        steps=800,
        rungs=8,
        batch_size=100,
        seed=1,
        progress=False,
        accept_proxy=False,
    )
    assert cal.qualified, str(cal)
    eps = cal.recommended
    # the bias that SGLD has at ε on this model is ≈ ε·(nβ + γ + V_g)/4 (docs/sgmcmc.md):
    # the recommended step must sit where that is within the 2% tolerance
    assert 2e-5 <= eps <= 4e-4, str(cal)
    ref = post.sample(
        "sgld",
        chains=64,
        warmup=2000,
        draws=2000,
        thin=4,
        step_size=eps,
        batch_size=100,
        seed=7,
        progress=False,
    )
    lam = ref.llc(warn_user=False)
    assert lam.stderr < 0.012 * exact  # the 3% band is ≥ 2.5 MC s.e.
    assert abs(lam.mean - exact) <= 0.03 * exact, (lam.mean, lam.stderr, exact, eps)
    assert abs(lam.mean - 3.0) <= 0.03 * 3.0
    assert any("recommended" in line for line in cal.reasoning)


def test_falls_back_to_the_smallest_healthy_step_with_a_warning():
    """Only large steps on the ladder: none meets the tolerance, the answer is the
    smallest one that reached a plateau, and the warning says so."""
    _, post = _regular()
    with pytest.warns(cp.SamplerWarning, match="no step size met the tolerance"):
        res = calibrate_step_size(
            post, "sgld", [4e-3, 8e-3, 1.6e-2], chains=8, steps=300, batch_size=100, progress=False
        )
    assert not res.qualified and res.recommended == 4e-3
    assert "smallest that reached a plateau" in res.reasoning[-1]
    assert "FALLBACK" in str(res)


def test_all_diverged_still_answers():
    _, post = _regular()
    with pytest.warns(cp.SamplerWarning, match="no step size met"):
        res = calibrate_step_size(post, "sgld", [1.0, 2.0], chains=2, steps=200, progress=False)
    assert res.recommended == 1.0 and not res.qualified
    assert all(r["status"].startswith("diverged") for r in res.rows)
    assert "Every step size diverged" in res.reasoning[-1]


def test_small_network_d40_gets_a_step_with_reasoning():
    """A 5-5-2 tanh MLP, d = 5·5 + 5 + 5·2 + 2 = 42 (default ladder)."""
    post = _mlp_post([5, 5, 2], n=200)
    assert 35 <= post.d <= 45
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cp.SamplerWarning)
        # max_steps: the relaxation-sized rungs (h_min = γ = 1 here) would otherwise run up
        # to 32·400 steps each; the rule itself is tested on a model with a known h_min
        res = calibrate_step_size(
            post,
            "sgld",
            chains=16,
            steps=400,
            rungs=6,
            batch_size=100,
            progress=False,
            max_steps=1600,
        )
    assert math.isfinite(res.recommended) and res.recommended > 0
    healthy = [r for r in res.rows if r["status"] == "ok"]
    assert healthy and res.recommended in [r["step_size"] for r in res.rows]
    assert len(res.reasoning) >= 2
    # when it qualified, the stated bias of the recommendation is within the tolerance
    if res.qualified:
        row = next(r for r in res.rows if r["step_size"] == res.recommended)
        assert abs(row["llc_bias"]) + row["llc_bias_se"] <= 0.02 + 1e-12


def test_resolve_step_size_auto():
    """``step_size="auto"`` becomes the calibrated number; other options pass through."""
    _, post = _regular()
    opts = {"step_size": 1e-4, "batch_size": 100}
    assert resolve_step_size(post, "sgld", opts) == opts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cp.SamplerWarning)
        out = resolve_step_size(
            post, "sgld", {"step_size": "auto", "batch_size": 100}, chains=8, steps=200, rungs=5
        )
    assert isinstance(out["step_size"], float) and out["batch_size"] == 100
    ref = post.sample("sgld", chains=2, warmup=100, draws=50, progress=False, **out)
    assert np.isfinite(ref.llc(warn_user=False).mean)


def test_network_of_ten_thousand_weights():
    """A ~10⁴-weight MLP on (a + b) mod 23 (all weights lifted): an answer with reasoning
    from short runs, and a finite λ̂ at it."""
    from test_calibration_net import mod_mlp

    net, x, y = mod_mlp()
    post = cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=100.0, check_center=False)
    assert 9000 <= post.d <= 10000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cp.SamplerWarning)
        res = calibrate_step_size(
            post, "sgld", chains=2, steps=100, rungs=4, batch_size=128, progress=False
        )
    assert math.isfinite(res.recommended) and res.recommended > 0
    assert res.settings["h_max"] >= 100.0 and res.reasoning


@pytest.mark.slow
def test_network_of_a_hundred_thousand_weights():
    """d ≈ 10⁵: the default ladder and an answer (measured in benchmarks/stepsize_scaling.py)."""
    from test_calibration_net import mod_mlp

    net, x, y = mod_mlp(h1=512, h2=128, steps=300)
    post = cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=100.0, check_center=False)
    assert 8e4 <= post.d <= 1.2e5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cp.SamplerWarning)
        res = calibrate_step_size(
            post, "sgld", chains=2, steps=200, rungs=5, batch_size=128, progress=False
        )
    assert math.isfinite(res.recommended) and res.recommended > 0 and res.reasoning


def test_default_ladder_extends_below_a_singular_centre():
    """At a singular w* (a two-layer linear network at the origin) the loss Hessian
    vanishes, the curvature-based ladder starts at 2/γ and every rung of it diverges; the
    ladder must extend downwards and recommend a step that did not diverge."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    x = torch.randn(2000, 3)
    y = 0.1 * torch.randn(2000, 2)
    post = cp.LocalPosterior(net, (x, y), cp.Gaussian(0.1), localization=1.0, check_center=False)
    cal = cp.calibrate_step_size(post, "sgld", steps=60, chains=4, warn_user=False)
    # the curvature at w* is only γ plus the small data-noise cross term, far below the
    # curvature nβ/s²·‖W‖² the chains meet once they leave the origin
    assert cal.settings["h_max"] < 0.01 * post.nbeta / 0.1**2
    rec = [r for r in cal.rows if r["step_size"] == cal.recommended][0]
    assert not rec["status"].startswith("diverged")
    assert cal.recommended < 2.0 / 2**7  # below the original ladder's bottom rung
    assert any("extended downwards" in line for line in cal.reasoning)


def _half_identified(gamma=10.0, n=1000, din=3, null=2, k=2, seed=4):
    """§4.2's whitened model with ``null`` all-zero input columns: their ``k·null`` weights
    are held only by the localizer, so the slowest curvature of U is exactly γ and the
    chains' relaxation time at step ε is 1/(εγ); λ̂'s exact mean is unchanged."""
    from analytic import LinearGaussianProblem

    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, din, generator=g, dtype=torch.float64))
    Xi = Q * math.sqrt(n)
    Y = Xi @ torch.randn(k, din, generator=g, dtype=torch.float64).T
    Y = Y + torch.randn(n, k, generator=g, dtype=torch.float64)
    W = torch.cat(
        [torch.linalg.lstsq(Xi, Y).solution.T, torch.zeros(k, null, dtype=torch.float64)], 1
    )
    X = torch.cat([Xi, torch.zeros(n, null, dtype=torch.float64)], 1)
    prob = LinearGaussianProblem(X, Y, 1.0, n / math.log(n), gamma, W.reshape(-1).numpy(), [])
    post = cp.LocalPosterior(
        linear_net(prob), (prob.X, prob.Y), cp.Gaussian(scale=1.0), localization=gamma
    )
    return prob, post


def test_rungs_are_sized_by_the_relaxation_time():
    """Issue 12: each rung runs max(steps, τ) with τ = 1/(εγ) (the localizer-held directions),
    starting where the rung above ended, so the small rungs are relaxed (virial ≈ 1) where
    fixed 40-step rungs from w* are not; the recommended step's λ̂ matches the exact value
    within the tolerance plus 3 MC standard errors."""
    prob, post = _half_identified()
    gamma, exact = prob.gamma, prob.expected_nbeta_dL()
    kw = dict(chains=64, steps=40, rungs=7, batch_size=1000, seed=2, progress=False)
    cal = calibrate_step_size(post, "sgld", accept_proxy=False, warn_user=False, **kw)
    assert cal.settings["h_min"] == pytest.approx(gamma, rel=1e-6)
    for r in cal.rows:
        assert r["relaxation_time"] == pytest.approx(1.0 / (r["step_size"] * gamma), rel=1e-9)
        # max(steps, τ), doubled (up to max_steps) only while ‖w − w*‖² drifted
        base = max(40, math.ceil(r["relaxation_time"]))
        cap = cal.settings["max_steps"]
        assert r["steps"] in {min(base * 2**j, cap) for j in range(6)}, r
    small = [r for r in cal.rows if r["relaxation_time"] > 100]
    assert len(small) >= 2
    for r in small:  # relaxed: the virial ratio is 1 up to SGLD's O(ε) bias and MC error
        assert r["status"] == "ok", str(cal)
        assert abs(r["virial"] - 1.0) <= 0.03 + 3 * r["virial_se"], str(cal)
    rec = next(r for r in cal.rows if r["step_size"] == cal.recommended)
    assert cal.qualified, str(cal)
    assert abs(rec["llc"] - exact) <= 0.02 * exact + 3 * rec["llc_se"], (rec, exact)
    assert any("relaxation time" in line for line in cal.reasoning)
    # the same ladder with fixed rungs from w* (relax=0): the smallest rungs cannot relax
    old = calibrate_step_size(post, "sgld", accept_proxy=False, warn_user=False, relax=0, **kw)
    assert all(r["steps"] == 40 for r in old.rows)
    low = min(old.rows, key=lambda r: r["step_size"])
    assert low["virial"] < 0.8, str(old)
