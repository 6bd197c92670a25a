"""Lifting, likelihood values, and the bad-input contract (clear errors naming the fix)."""

import math

import numpy as np
import pytest
import torch

import condpost as cp
from condpost.lifting import LiftedNetwork


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4)
        )

    def forward(self, x):
        return x + self.mlp(x)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _net():
    torch.manual_seed(0)
    return Net().double()


def _data(n=40):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _identical(net, snap):
    return all(
        torch.equal(v, snap[k]) and v.dtype == snap[k].dtype for k, v in net.state_dict().items()
    )


def test_include_exclude_globs_and_flat_roundtrip():
    net = _net()
    L = LiftedNetwork(net, include=["blocks.1.*", "head.weight"], exclude="blocks.1.mlp.2.bias")
    assert L.names == [
        "blocks.1.mlp.0.weight",
        "blocks.1.mlp.0.bias",
        "blocks.1.mlp.2.weight",
        "head.weight",
    ]
    assert L.d == 24 + 6 + 24 + 12
    w = torch.randn(L.d, dtype=torch.float64)
    named = L.unflatten(w)
    assert named["head.weight"].shape == (3, 4)
    assert torch.equal(L.flatten(named), w)
    # module-path patterns select everything below
    assert LiftedNetwork(net, include="blocks.0.mlp").names == [
        "blocks.0.mlp.0.weight",
        "blocks.0.mlp.0.bias",
        "blocks.0.mlp.2.weight",
        "blocks.0.mlp.2.bias",
    ]
    # functional forward at w* equals the module's forward
    x, _ = _data()
    assert torch.allclose(L.forward(L.center, x), net(x))
    # batched unflatten
    assert L.unflatten(torch.zeros(5, L.d, dtype=torch.float64))["head.weight"].shape == (5, 3, 4)


def test_activation_capture_at_nested_sites():
    net = _net()
    x, _ = _data()
    L = LiftedNetwork(net)
    out, acts = L.forward(L.center, x, sites=["blocks.0.mlp", "blocks.1", "blocks.0.mlp.1"])
    with torch.no_grad():
        h0 = net.blocks[0].mlp(x)
        assert torch.allclose(acts["blocks.0.mlp"], h0)
        assert torch.allclose(acts["blocks.1"], net.blocks[1](x + h0))
        assert torch.all(acts["blocks.0.mlp.1"] >= 0)
    # changing w changes activations (the capture is of the functional pass, not the module)
    _, acts2 = L.forward(L.center + 0.1, x, sites=["blocks.0.mlp"])
    assert not torch.allclose(acts2["blocks.0.mlp"], h0)


def test_module_never_mutated_by_any_call():
    net = _net()
    x, y = _data()
    snap = _snapshot(net)
    post = cp.LocalPosterior(
        net,
        (x, y),
        cp.Categorical(),
        localization=2.0,
        include=["head.*", "blocks.1.mlp.2.*"],
        check_center=False,
    )
    post.preserve(cp.Activations("blocks.1", x[:4], tolerance=0.1))
    ref = post.sample("nuts", chains=1, warmup=60, draws=30, seed=0, progress=False)
    ref.activations(x[:3], ["blocks.0.mlp"])
    ref.predict(x[:3])
    post.fit("svi", guide="normal", steps=30, progress=False).sample(10)
    post.fit("svi", guide="lowrank", steps=30, progress=False)
    assert _identical(net, snap)
    assert all(not m._forward_hooks for m in net.modules())


def test_likelihood_values_against_closed_forms():
    out = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([[0.0, -1.0], [1.5, 1.0]], dtype=torch.float64)
    s = 0.7
    g = cp.Gaussian(scale=s).nll(out, y)
    manual = [
        sum(
            (yy - oo) ** 2 / (2 * s * s) + math.log(s) + 0.5 * math.log(2 * math.pi)
            for yy, oo in zip(yr.tolist(), orow.tolist(), strict=True)
        )
        for yr, orow in zip(y, out, strict=True)
    ]
    assert np.allclose(g.numpy(), manual, rtol=1e-12)
    logits = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    c = cp.Categorical().nll(logits, torch.tensor([1]))
    assert math.isclose(
        float(c), -(2.0 - math.log(math.e + math.e**2 + math.e**0.5)), rel_tol=1e-12
    )
    b = cp.Bernoulli().nll(
        torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)
    )
    assert math.isclose(float(b), math.log(1 + math.exp(-0.3)), rel_tol=1e-12)


def test_custom_nll_callable_equals_builtin():
    net = _net()
    x, y = _data()

    def nll(out, yy):
        return torch.nn.functional.cross_entropy(out, yy, reduction="none")

    p1 = cp.LocalPosterior(net, (x, y), nll, localization=1.0, check_center=False)
    p2 = cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=1.0, check_center=False)
    w = p1.center + 0.01
    assert torch.allclose(p1.potential(w), p2.potential(w), rtol=1e-12)
    assert p1.nbeta == pytest.approx(40 / math.log(40))


# ---------------------------------------------------------------- bad input
def test_unknown_parameter_pattern_lists_nearest():
    with pytest.raises(ValueError, match=r"include='blocks\.1\.mlpp\.\*'.*Nearest.*blocks\.1\.mlp"):
        LiftedNetwork(_net(), include="blocks.1.mlpp.*")
    with pytest.raises(ValueError, match="exclude='headd'"):
        LiftedNetwork(_net(), exclude="headd")


def test_unknown_site_lists_nearest():
    x, y = _data()
    post = cp.LocalPosterior(_net(), (x, y), cp.Categorical(), localization=1.0, check_center=False)
    with pytest.raises(ValueError, match=r"'blocks\.0\.mpl' is not a module path.*blocks\.0\.mlp"):
        post.preserve(cp.Activations("blocks.0.mpl", x[:3], tolerance=0.1))


def test_probe_shape_and_dtype_errors():
    x, y = _data()
    post = cp.LocalPosterior(_net(), (x, y), cp.Categorical(), localization=1.0, check_center=False)
    with pytest.raises(ValueError, match=r"probes need shape \[m, 4\]"):
        post.preserve(cp.Activations("head", torch.randn(3, 5, dtype=torch.float64), tolerance=0.1))
    with pytest.raises(ValueError, match="non-finite"):
        post.preserve(cp.Activations("head", torch.full((2, 4), float("nan")), tolerance=0.1))


def test_labels_out_of_range():
    x, _ = _data()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\).*\[3, 7\]"):
        cp.LocalPosterior(
            _net(), (x, torch.tensor([0, 3, 7] * 13 + [1])), cp.Categorical(), localization=1.0
        )


def test_non_finite_data_and_weights():
    x, y = _data()
    xb = x.clone()
    xb[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"data\[0\] \(inputs x\) contains 1 non-finite"):
        cp.LocalPosterior(_net(), (xb, y), cp.Categorical(), localization=1.0)
    net = _net()
    with torch.no_grad():
        net.head.bias[0] = float("nan")
    with pytest.raises(ValueError, match="center"):
        cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=1.0)
    yg = torch.randn(40, 3, dtype=torch.float64)
    yg[0, 0] = float("nan")
    with pytest.raises(ValueError, match="targets"):
        cp.LocalPosterior(_net(), (x, yg), cp.Gaussian(scale=1.0), localization=1.0)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"localization": 0.0}, "localization"),
        ({"localization": -1.0}, "localization"),
        ({"localization": 1.0, "nbeta": 0.0}, "nbeta"),
        ({"localization": 1.0, "nbeta": -3.0}, "nbeta"),
        ({"localization": 1.0, "nbeta": "bic"}, "nbeta"),
        ({"localization": float("nan")}, "localization"),
    ],
)
def test_gamma_and_nbeta_must_be_positive(kw, match):
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        cp.LocalPosterior(_net(), (x, y), cp.Categorical(), **kw)


def test_localization_is_required():
    x, y = _data()
    with pytest.raises(TypeError, match="localization"):
        cp.LocalPosterior(_net(), (x, y), cp.Categorical())


def test_likelihood_wrong_shape():
    x, y = _data()
    with pytest.raises(ValueError, match=r"per-sample negative log-likelihoods of shape \[n\]"):
        cp.LocalPosterior(
            _net(),
            (x, y),
            lambda out, yy: torch.nn.functional.cross_entropy(out, yy),
            localization=1.0,
        )
    with pytest.raises(ValueError, match="Gaussian: targets have shape"):
        cp.LocalPosterior(
            _net(),
            (x, torch.randn(40, dtype=torch.float64)),
            cp.Gaussian(scale=1.0),
            localization=1.0,
        )
    with pytest.raises(ValueError, match="scale"):
        cp.Gaussian(scale=0.0)


def test_training_mode_dropout_is_rejected():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1), torch.nn.Linear(4, 3))
    x, y = _data()
    with pytest.raises(ValueError, match=r"net\.eval\(\)"):
        cp.LocalPosterior(net, (x.float(), y), cp.Categorical(), localization=1.0)


def test_tolerance_strength_errors():
    with pytest.raises(ValueError, match="exactly one of tolerance"):
        cp.Activations("head", torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tolerance must be a positive"):
        cp.Activations("head", torch.zeros(2, 4), tolerance=-0.1)
    x, y = _data()
    post = cp.LocalPosterior(_net(), (x, y), cp.Categorical(), localization=1.0, check_center=False)
    with pytest.raises(ValueError, match="not lifted"):
        cp.LocalPosterior(
            _net(), (x, y), cp.Categorical(), localization=1.0, include="head.*", check_center=False
        ).preserve(cp.WeightZeroPattern("blocks.0.*", 0.1, tolerance=0.1))
    with pytest.raises(ValueError, match="Raise the threshold"):
        post.preserve(cp.WeightZeroPattern("head.weight", 1e-9, tolerance=0.1))
    post.preserve(cp.Activations("head", x[:2], tolerance=0.1))
    head_only = cp.LocalPosterior(
        _net(), (x, y), cp.Categorical(), localization=1.0, include="head.*", check_center=False
    )
    with pytest.raises(ValueError, match="does not depend on any lifted parameter"):
        head_only.preserve(cp.Activations("blocks.1", x[:2], tolerance=0.1))
    with pytest.raises(ValueError, match="already declared"):
        post.preserve(cp.Activations("head", x[:2], tolerance=0.2))


def test_center_far_from_minimum_warns():
    x, y = _data(200)
    net = _net()
    with pytest.warns(
        cp.CenterWarning, match=r"not at a (local )?minimum.*\|∇\(nβ L_n\)\(w\*\)\| ="
    ):
        cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=1.0)


def test_divergences_warned_and_kept():
    # a very tight tolerance on a constrained direction with a huge forced step size
    x, y = _data()
    post = cp.LocalPosterior(
        _net(), (x, y), cp.Categorical(), localization=1.0, include="head.*", check_center=False
    )
    with pytest.warns(cp.SamplerWarning, match="divergent transition"):
        ref = post.sample(
            "hmc",
            backend="pyro",  # Pyro flags these energy errors as divergent; NumPyro's HMC
            chains=1,  # rejects them (acceptance ~0.003) without the flag
            warmup=100,
            draws=40,
            seed=0,
            progress=False,
            step_size=5.0,
            num_steps=8,
            adapt_step_size=False,
            adapt_mass_matrix=False,
        )
    assert ref.diverging.sum() > 0
    assert ref.flat().shape == (1, 40, post.d)  # no draw lost
    s = ref.summary(warn_user=False)
    assert s.divergences == int(ref.diverging.sum())
    assert any("divergent" in m for m in s.warnings)
