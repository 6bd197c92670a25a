"""``condpost.sweep``: curves over the precision scale against closed forms.

The linear-Gaussian model of docs/theory.md §4.1 has the exact posterior N(μ, Σ(nβ, γ, σ)), so
``I(X;B)`` for two probes (docs/theory.md §4.4 ii) is known in closed form (1-D quadrature) at
every nβ, γ and tolerance, and so is the weighted least-squares line through it. The
default tests sample with an exact Gaussian sampler (a callable ``method``) to isolate the
sweep machinery from MCMC error and stay fast; a slow test repeats the nβ sweep with NUTS.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem
from test_info_ensemble import mixture_mi_1d

import condpost as cp
from condpost.reference import ReferenceClass
from condpost.sweep import SweepResult, sweep

PROBES = torch.tensor([[0.6, -0.3], [0.75, -0.2]], dtype=torch.float64)
CONSTRAINT_PROBE = torch.tensor([[1.0, 0.0]], dtype=torch.float64)


def _problem():
    return make_problem(seed=2, din=2, k=1)


def _post(prob, constrained=False, tol=0.1):
    post = cp.LocalPosterior(
        linear_net(prob),
        data=(prob.X, prob.Y),
        likelihood=cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )
    if constrained:
        post.preserve(cp.Activations("", CONSTRAINT_PROBE, tolerance=tol, name="act"))
    return post


def _exact_posterior(prob, post):
    """Closed-form N(μ, Σ) at the declaration's nβ, γ and tolerances (tests/analytic.py)."""
    prob.nbeta, prob.gamma = post.nbeta, post.localization
    prob.constraints = []
    for b in post.constraints:
        C = np.kron(np.eye(prob.k), CONSTRAINT_PROBE.numpy())
        prob.constraints.append((C, C @ prob.w_star, b.tolerance))
    return prob.posterior()


def _exact_sampler(prob):
    def sampler(post, *, chains, warmup, draws, seed, progress, **kw):
        mu, Sigma = _exact_posterior(prob, post)
        rng = np.random.default_rng(seed)
        W = rng.multivariate_normal(mu, Sigma, size=(chains, draws))
        return ReferenceClass.from_draws(post, torch.as_tensor(W), settings={"method": "exact"})

    return sampler


def _exact_mi(prob, post):
    mu, Sigma = _exact_posterior(prob, post)
    P = PROBES.numpy()
    return mixture_mi_1d(P @ mu, np.einsum("ij,jk,ik->i", P, Sigma, P))


MI = dict(probes=PROBES, b="", target="input", bootstrap=40)


def test_nbeta_sweep_values_and_slope_match_closed_form():
    """Per-setting I(X;B) within max(4 SE, 0.03) of the exact value, and the fitted
    dI/d log nβ within 4 SE of the WLS slope through the exact values (same weights)."""
    prob = _problem()
    post = _post(prob)
    nbetas = [3.0, 10.0, 30.0, 100.0]
    res = sweep(
        post,
        nbeta=nbetas,
        method=_exact_sampler(prob),
        mi=MI,
        chains=2,
        draws=1000,
        progress=False,
    )
    assert isinstance(res, SweepResult)
    assert res.knob == "nbeta" and res.values == nbetas
    assert [s["nbeta"] for s in res.settings] == nbetas
    exact = np.array([_exact_mi(prob, post.with_nbeta(nb)) for nb in nbetas])
    assert exact[0] < 0.15 and exact[-1] > 0.4  # a curve, not a plateau
    val, se = res.value("mi"), res.stderr("mi")
    assert np.all(se > 0)
    assert np.all(np.abs(val - exact) <= np.maximum(4 * se, 0.03)), (val, exact, se)
    # the exact WLS slope through the true curve, with the estimated weights
    x = np.log(nbetas)
    X = np.stack([np.ones_like(x), x], 1)
    w = 1 / se**2
    beta = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * exact))
    sl = res.slope("mi")
    assert sl.x == "log nβ" and sl.dof == 2
    assert abs(sl.value - beta[1]) <= 4 * sl.stderr, (sl.value, beta[1], sl.stderr)
    assert sl.value > 0.05  # MI grows as the reference class shrinks
    # every InfoResult records its precision scale
    for r, nb in zip(res.results["mi"], nbetas, strict=True):
        assert r.settings["nbeta"] == pytest.approx(nb)
        assert r.settings["localization"] == pytest.approx(prob.gamma)
    table = res.table()
    assert "nbeta" in table and "±" in table and len(table.splitlines()) == 2 + len(nbetas)


def test_slope_weighted_least_squares_by_hand():
    """Slope and SE against the textbook WLS formulas on synthetic points."""
    x = np.array([1.0, 10.0, 100.0, 1000.0])
    y = 0.5 * np.log(x) + np.array([0.01, -0.02, 0.015, 0.0])
    se = np.array([0.01, 0.02, 0.01, 0.03])
    r = SweepResult("nbeta", list(x), {"I": list(zip(y, se, strict=True))}, {"I": []}, [{}] * 4)
    t = np.log(x)
    w = 1 / se**2
    S, Sx, Sy = w.sum(), (w * t).sum(), (w * y).sum()
    Sxx, Sxy = (w * t * t).sum(), (w * t * y).sum()
    delta = S * Sxx - Sx**2
    slope = (S * Sxy - Sx * Sy) / delta
    sl = r.slope()
    assert sl.value == pytest.approx(slope, rel=1e-12)
    assert sl.stderr == pytest.approx(math.sqrt(S / delta), rel=1e-12)
    intercept = (Sxx * Sy - Sx * Sxy) / delta
    chi2 = float((w * (y - intercept - slope * t) ** 2).sum())
    assert sl.chi2 == pytest.approx(chi2, rel=1e-10) and sl.dof == 2
    assert sl.stderr_scaled == pytest.approx(sl.stderr * math.sqrt(max(1, chi2 / 2)))
    # without standard errors: OLS with a residual-based error
    r2 = SweepResult("nbeta", list(x), {"I": [float(v) for v in y]}, {"I": []}, [{}] * 4)
    r2.observables["I"] = [(float(v), float("nan")) for v in y]
    sl2 = r2.slope()
    ols = np.polyfit(t, y, 1, cov=True)
    assert sl2.value == pytest.approx(ols[0][0], rel=1e-10)
    assert sl2.stderr == pytest.approx(math.sqrt(ols[1][0, 0]), rel=1e-8)


def test_tolerance_sweep_matches_closed_form():
    """Tightening an output constraint on a third probe sharpens B: I(X;B) follows the
    exact conditioned posterior at each σ (docs/theory.md §4.1); tolerance max(4 SE, 0.03)."""
    prob = _problem()
    post = _post(prob, constrained=True, tol=1.0)._replace(nbeta=3.0)
    tols = [1.0, 0.3, 0.1, 0.03]
    res = sweep(
        post,
        tolerance={"act": tols},
        method=_exact_sampler(prob),
        mi=MI,
        observables={"loss": lambda ref: float(ref.loss().mean())},
        chains=2,
        draws=1000,
        progress=False,
    )
    assert res.knob == "tolerance:act"
    assert [s["constraints"]["act"]["tolerance"] for s in res.settings] == tols
    exact = []
    for t in tols:
        p = post._replace(constraints=[cp.Activations("", CONSTRAINT_PROBE, tolerance=t)])
        exact.append(_exact_mi(prob, p))
    val, se = res.value("mi"), res.stderr("mi")
    assert np.all(np.abs(val - np.array(exact)) <= np.maximum(4 * se, 0.03)), (val, exact, se)
    assert exact[-1] - exact[0] > 0.3  # exact: 0.142, 0.212, 0.428, 0.552
    assert np.isnan(res.stderr("loss")).all()
    assert res.slope("mi").x == "log σ[act]"


def test_plot_and_localization_sweep():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    prob = _problem()
    post = _post(prob)
    res = sweep(
        post,
        localization=[0.1, 10.0],
        method=_exact_sampler(prob),
        observables={"mean_loss": lambda ref: float(ref.loss().mean())},
        chains=1,
        draws=200,
        progress=False,
    )
    assert [s["localization"] for s in res.settings] == [0.1, 10.0]
    assert len(res.refs) == 2 and res.refs[1].localization == 10.0
    ax = res.plot()
    assert ax.get_xscale() == "log"
    assert len(ax.lines[0].get_xdata()) == 2
    d = res.to_dict()
    assert d["knob"] == "localization" and len(d["observables"]["mean_loss"]) == 2


def test_warm_start_passes_scaled_step_size():
    """NUTS: setting k+1 starts adaptation from setting k's step size × sqrt(nβ_k/nβ_{k+1})."""
    prob = _problem()
    post = _post(prob)
    res = sweep(
        post,
        nbeta=[10.0, 40.0],
        observables={"loss": lambda ref: float(ref.loss().mean())},
        chains=1,
        warmup=60,
        draws=40,
        progress=False,
    )
    step0 = float(np.median(res.refs[0].stat("sampler/step_size")))
    assert res.settings[0]["initial_step_size"] is None
    assert res.settings[1]["initial_step_size"] == pytest.approx(step0 * math.sqrt(10 / 40))
    assert res.refs[1].settings["method"] == "nuts"


def test_sweep_errors():
    prob = _problem()
    post = _post(prob, constrained=True)
    samp = _exact_sampler(prob)
    with pytest.raises(ValueError, match="exactly one knob"):
        sweep(post, nbeta=[1.0], localization=[1.0], mi=MI)
    with pytest.raises(ValueError, match="exactly one knob"):
        sweep(post, mi=MI)
    with pytest.raises(ValueError, match=r"no constraint named 'ac'.*nearest: \['act'\]"):
        sweep(post, tolerance={"ac": [0.1]}, mi=MI)
    with pytest.raises(ValueError, match="positive and finite"):
        sweep(post, nbeta=[10.0, -1.0], mi=MI)
    with pytest.raises(ValueError, match="repeated values"):
        sweep(post, nbeta=[10.0, 10.0], mi=MI)
    with pytest.raises(ValueError, match="nothing to measure"):
        sweep(post, nbeta=[10.0])
    with pytest.raises(TypeError, match="observables\\['x'\\] is not callable"):
        sweep(post, nbeta=[10.0], observables={"x": 3})
    with pytest.raises(TypeError, match="an observable returned a str"):
        sweep(
            post,
            nbeta=[10.0],
            method=samp,
            observables={"x": lambda ref: "high"},
            chains=1,
            draws=10,
            progress=False,
        )
    res = sweep(
        post,
        nbeta=[10.0],
        method=samp,
        observables={"x": lambda ref: 1.0},
        chains=1,
        draws=10,
        progress=False,
    )
    with pytest.raises(ValueError, match="a slope needs ≥ 2 settings"):
        res.slope()
    with pytest.raises(KeyError, match="no observable 'y'"):
        res.value("y")


@pytest.mark.slow
def test_nbeta_sweep_with_nuts_matches_closed_form():
    prob = _problem()
    post = _post(prob)
    nbetas = [3.0, 10.0, 30.0, 100.0]
    res = sweep(
        post,
        nbeta=nbetas,
        mi=dict(MI, bootstrap=100),
        chains=2,
        warmup=300,
        draws=2000,
        progress=False,
    )
    exact = np.array([_exact_mi(prob, post.with_nbeta(nb)) for nb in nbetas])
    val, se = res.value("mi"), res.stderr("mi")
    assert np.all(np.abs(val - exact) <= np.maximum(4 * se, 0.03)), (val, exact, se)
    x = np.log(nbetas)
    X = np.stack([np.ones_like(x), x], 1)
    w = 1 / se**2
    beta = np.linalg.solve(X.T @ (w[:, None] * X), X.T @ (w * exact))
    sl = res.slope("mi")
    assert abs(sl.value - beta[1]) <= 4 * sl.stderr, (sl.value, beta[1], sl.stderr)


def test_plot_one_unit_per_axis():
    """Accuracy, binding, virial and MI never share an axis: one panel per unit, each
    labelled with its unit, and plot returns the Axes."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    res = SweepResult(
        knob="nbeta",
        values=[10.0, 100.0, 1000.0],
        observables={
            "mi": [(0.1, 0.01), (0.2, 0.01), (0.3, 0.02)],
            "mi_channel": [(0.1, 0.01), (0.25, 0.01), (0.35, 0.02)],
            "accuracy": [(0.9, float("nan")), (0.95, float("nan")), (0.99, float("nan"))],
            "binding": [(0.1, 0.01), (0.2, 0.01), (0.3, 0.01)],
            "virial": [(1.0, 0.01), (1.01, 0.01), (0.99, 0.01)],
        },
        results={},
        settings=[{}, {}, {}],
    )
    axes = res.plot()
    assert isinstance(axes, list) and len(axes) == 4
    labels = [a.get_ylabel() for a in axes]
    assert labels == ["nats", "fraction (accuracy)", "binding ratio", "virial ratio"]
    assert len(axes[0].containers) == 2 and all(len(a.containers) == 1 for a in axes[1:])
    assert all(a.get_xscale() == "log" for a in axes)
    assert axes[-1].get_xlabel() == "nβ"
    # one unit: a single Axes; an override puts an observable on its own axis
    ax = res.plot(names=["mi", "mi_channel"])
    assert ax.get_ylabel() == "nats" and len(ax.containers) == 2
    axes = res.plot(names=["mi", "mi_channel"], units={"mi_channel": "nats (channel)"})
    assert [a.get_ylabel() for a in axes] == ["nats", "nats (channel)"]
    # axes passed in: one per unit
    import matplotlib.pyplot as plt

    _, given = plt.subplots(1, 2)
    out = res.plot(ax=given, names=["accuracy", "virial"])
    assert list(out) == list(given)
    with pytest.raises(ValueError, match="one Axes per unit"):
        res.plot(ax=given[0], names=["accuracy", "virial"])
    plt.close("all")
