"""Bad input gets a clear error naming the argument, what is wrong and the fix.

One test per bad input of issue 12: a warning where the result is still usable, an error
otherwise, and never a raw error from deep inside torch.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import condpost as cp


def _data(n=40, din=4, classes=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, din, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def _post(net=None, data=None, lik=None, **kw):
    kw.setdefault("localization", 1.0)
    kw.setdefault("check_center", False)
    return cp.LocalPosterior(
        net if net is not None else _mlp(), data or _data(), lik or cp.Categorical(), **kw
    )


# ---------------------------------------------------------------- parameters
class _Temperature(nn.Module):
    """A learnable 0-dimensional temperature."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.t = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) / self.t


def test_zero_dim_parameter_is_lifted():
    net = _Temperature().double()
    x, y = _data()
    post = _post(net, (x, y))
    assert post.d == 4 * 3 + 3 + 1 and post.lifted.names == ["t", "lin.weight", "lin.bias"]
    w = post.center.clone()
    w[post.lifted.slice_of("t")] = 3.0  # doubling t halves the logits
    with torch.no_grad():
        expected = F.cross_entropy(net.lin(x) / 3.0, y, reduction="none").mean()
    assert torch.allclose(post.loss(w), expected, rtol=1e-12)
    assert post.lifted.unflatten(w)["t"].shape == ()


class _IntScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.k = nn.Parameter(torch.tensor([2]), requires_grad=False)  # first, and integer
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) * self.k


def test_integer_parameter_is_not_lifted_and_never_blamed_as_a_dtype():
    net = _IntScale().double()
    with pytest.warns(cp.CondpostWarning, match=r"non-floating parameter\(s\) 'k' .*not lifted"):
        post = _post(net)
    assert post.lifted.names == ["lin.weight", "lin.bias"] and post.dtype == torch.float64
    with pytest.raises(TypeError, match=r"include selects non-floating parameter\(s\) 'k'.*"):
        _post(_IntScale().double(), include=["k", "lin.*"])
    _post(_IntScale().double(), exclude="k")  # excluding it says so: no warning


def test_include_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"include must be a glob pattern.*got int 0.*'0\.\*'"):
        _post(include=0)


# ---------------------------------------------------------------- stochastic forwards
def test_rrelu_in_training_mode_is_rejected():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.RReLU(), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match=r"training mode \(\['1'\]\).*net\.eval\(\)"):
        _post(net)
    _post(net.eval())


class _FunctionalDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return F.dropout(self.lin(x), 0.5, training=True)


class _NoisyForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) + 0.1 * torch.randn(x.shape[0], 3, dtype=x.dtype)


@pytest.mark.parametrize("net_cls", [_FunctionalDropout, _NoisyForward])
def test_random_forward_is_detected_at_declaration(net_cls):
    with pytest.raises(ValueError, match=r"net: the forward pass is random.*net\.eval\(\)"):
        _post(net_cls().double())


# ---------------------------------------------------------------- zero gradients
class _Detached(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.op = nn.Linear(4, 6), nn.Linear(6, 3), op

    def forward(self, x):
        return self.b(self.op(self.a(x)))


@pytest.mark.parametrize("op", [torch.Tensor.detach, torch.round], ids=["detach", "round"])
def test_zero_gradient_parameters_are_named_at_declaration(op):
    torch.manual_seed(0)
    net = _Detached(op).double()
    with pytest.warns(cp.CondpostWarning, match=r"\['a\.weight', 'a\.bias'\] is identically zero"):
        post = _post(net)
    # still usable: a lifted set without them declares silently
    _post(net, include="b.*")
    assert post.d == 6 * 4 + 6 + 3 * 6 + 3


# ---------------------------------------------------------------- data
def test_empty_data():
    x, y = _data()
    with pytest.raises(
        ValueError, match=r"data is empty: data\[0\] \(inputs x\) has shape \(0, 4\)"
    ):
        _post(data=(x[:0], y[:0]))


def test_one_dimensional_x():
    x, y = _data()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"shape \(40,\).*x is 1-D.*x\.unsqueeze\(-1\)"):
        _post(nn.Linear(1, 3).double(), (x[:, 0], y))
    with pytest.raises(ValueError, match=r"first dimension must be the n = 40.*unsqueeze"):
        _post(nn.Linear(40, 3).double(), (x[:, 0], y))
    _post(nn.Linear(1, 3).double(), (x[:, :1], y))


def test_integer_x_for_a_linear_layer():
    _, y = _data()
    xi = torch.randint(0, 3, (40, 4))
    with pytest.raises(ValueError, match=r"integer dtype torch\.int64.*x\.to\(torch\.float64\)"):
        _post(data=(xi, y))
    # integer inputs stay valid for embeddings
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(12, 3)).double()
    _post(emb, (xi, y))


def test_bool_labels():
    x, y = _data(classes=2)
    net = nn.Sequential(nn.Linear(4, 2)).double()
    a = _post(net, (x, y.bool()))
    b = _post(net, (x, y))
    assert a.y.dtype == torch.long and a.loss_center == b.loss_center
    torch.manual_seed(0)
    one = nn.Linear(4, 1).double()
    bern = _post(one, (x, y.bool()[:, None]), cp.Bernoulli())
    assert bern.loss_center == _post(one, (x, y[:, None].double()), cp.Bernoulli()).loss_center
    with pytest.raises(TypeError, match=r"data\[1\] \(targets y\) is boolean.*cp\.Bernoulli"):
        _post(one, (x, y.bool()[:, None]), cp.Gaussian(scale=1.0))


# ---------------------------------------------------------------- tolerances
def test_tolerance_too_small_to_represent():
    post = _post()
    with pytest.raises(ValueError, match=r"tolerance=1e-300 is too small to represent"):
        post.preserve(cp.Activations("1", post.x[:4], tolerance=1e-300))
    with pytest.raises(ValueError, match=r"tolerance=1e-300 is too small"):
        cp.preserve("c", torch.ones(2), torch.zeros(2), tolerance=1e-300)


def test_tolerance_below_what_a_sampler_resolves():
    post32 = _post(_mlp(torch.float32), _data(dtype=torch.float32))
    with pytest.raises(ValueError, match=r"tolerance=1e-08 is below the floating-point resolution"):
        post32.preserve(cp.Activations("1", post32.x[:4], tolerance=1e-8))
    post64 = _post()
    with pytest.warns(cp.ConstraintWarning, match=r"tolerance=1e-08 is .* times smaller"):
        post64.preserve(cp.Activations("1", post64.x[:4], tolerance=1e-8))
    _post().preserve(cp.Activations("1", post64.x[:4], tolerance=0.01))  # ordinary: silent


# ---------------------------------------------------------------- seeds
@pytest.mark.parametrize("seed", [-1, 1.7])
def test_bad_seed(seed):
    post = _post()
    with pytest.raises(ValueError, match=rf"seed must be an integer ≥ 0; got {seed}"):
        post.sample("nuts", backend="pyro", chains=1, warmup=5, draws=5, seed=seed, progress=False)
    with pytest.raises(ValueError, match=rf"seed must be an integer ≥ 0; got {seed}"):
        post.fit("svi", steps=5, seed=seed, progress=False)


# ---------------------------------------------------------------- option names from other libraries
@pytest.mark.parametrize(
    "method,kw,match",
    [
        ("nuts", {"num_samples": 10}, "did you mean 'draws'"),
        ("nuts", {"num_warmup": 10}, "did you mean 'warmup'"),
        ("nuts", {"warmup_steps": 10}, "did you mean 'warmup'"),
        ("nuts", {"num_chains": 2}, "did you mean 'chains'"),
        ("nuts", {"target_accept_prob": 0.9}, "did you mean 'target_accept'"),
        ("sgld", {"lr": 1e-4}, "did you mean 'step_size'"),
        ("sgld", {"num_draws": 10}, "did you mean 'draws'"),
        ("sgld", {"nbeta": 10.0}, r"nβ is part of the declaration.*with_nbeta"),
    ],
)
def test_option_names_from_pyro_numpyro_devinterp(method, kw, match):
    post = _post()
    with pytest.raises(TypeError, match=match):
        post.sample(method, progress=False, **kw)


# ---------------------------------------------------------------- export
class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        if h.sum() > 0:  # data-dependent control flow: not exportable
            return 2 * h
        return h


def test_export_failure_is_short_and_prints_no_fx_graph(capfd):
    from condpost.export import ExportError, export_function

    with pytest.raises(ExportError, match=r"could not trace the model at .*test_bad_input\.py"):
        export_function(_Branchy().double(), (torch.randn(3, 4, dtype=torch.float64),))
    out, err = capfd.readouterr()
    assert "def forward" not in out + err and "torch.ops.aten" not in out + err
    assert math.isfinite(len(err))
