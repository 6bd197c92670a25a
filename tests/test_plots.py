"""condpost.plots: every function draws one unit per axis and returns its Axes."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")  # the optional extra condpost[plots]
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import condpost as cp  # noqa: E402
from condpost import plots  # noqa: E402
from condpost.sweep import SweepResult  # noqa: E402


@pytest.fixture(scope="module")
def ref():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = torch.tanh(x[:, :1]) + 0.1 * torch.randn(30, 1, generator=g, dtype=torch.float64)
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    post = cp.LocalPosterior(
        net.double(), (x, y), cp.Gaussian(scale=0.1), localization=10.0, check_center=False
    )
    post.preserve(cp.Activations("1", x[:4], tolerance=0.1, name="hidden"))
    W = post.center + 0.02 * torch.randn(3, 50, post.d, generator=g, dtype=torch.float64)
    return cp.ReferenceClass.from_draws(post, W, settings={"method": "test"})


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _sweep(knob="nbeta", label_obs="binding[hidden]"):
    vals = [10.0, 100.0, 1000.0]
    obs = {
        "llc": [(1.0, 0.1), (1.5, 0.1), (2.0, 0.2)],
        "mi": [(0.2, 0.05), (0.4, 0.05), (0.5, 0.1)],
        label_obs: [(0.1, 0.02), (0.5, 0.05), (0.9, 0.03)],
    }
    return SweepResult(knob, vals, obs, {}, [{} for _ in vals])


def test_trace_and_rank_through_arviz(ref):
    axes = plots.trace(ref, [0, 5])
    assert axes.shape == (3, 2)  # L_n and two coordinates, density and trace each
    assert "L_n" in axes[0, 0].get_title()
    assert "w[5]" in axes[2, 0].get_title()
    r = plots.rank(ref, [0])
    assert len(np.ravel(r)) == 2
    with pytest.raises(ValueError, match="outside"):
        plots.trace(ref, [ref.d])


def test_loss_trace_and_preservation_chart(ref):
    ax = plots.loss_trace(ref)
    assert isinstance(ax, plt.Axes) and len(ax.lines) == 4  # 3 chains + L_n(w*)
    assert "nats" in ax.get_ylabel()
    ax = plots.preservation(ref)
    assert isinstance(ax, plt.Axes) and ax.get_ylabel() == "fraction"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["hidden"]


def test_precision_curves_one_unit_per_axis():
    a, b = _sweep(), _sweep()
    ax = plots.precision_curve({"unconditioned": a, "conditioned": b}, "llc")
    assert isinstance(ax, plt.Axes)
    assert ax.get_ylabel().startswith("λ̂") and ax.get_xscale() == "log"
    assert len(ax.containers) == 2  # one error-bar curve per class
    ax = plots.precision_curve(a, "mi")
    assert ax.get_ylabel() == "nats"
    with pytest.raises(ValueError, match="no sweep measured"):
        plots.precision_curve(a, "nothing")


def test_binding_against_tolerance():
    sw = _sweep("tolerance:hidden")
    ax = plots.binding(sw)
    assert isinstance(ax, plt.Axes)
    assert ax.get_ylabel() == "binding ratio"
    assert "tolerance σ of hidden" in ax.get_xlabel()
