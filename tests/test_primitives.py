"""Pyro primitives: exact log-joint parity with the declarative API and handler semantics."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import condpost as cp


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)
    ).double()


def _data(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y


def _declared(net, x, y, include=None):
    post = cp.LocalPosterior(
        net,
        (x, y),
        cp.Categorical(),
        nbeta=25.0,
        localization=3.0,
        include=include,
        check_center=False,
    )
    probes = x[:5]
    post.preserve(cp.Activations("1", probes, tolerance=0.2))
    post.preserve(cp.Activations("2", probes, strength=0.5, name="logits-rel"))
    post.preserve(cp.WeightZeroPattern("2.weight", threshold=0.1, tolerance=0.05))
    return post


def _random_ws(post, k=20, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        post.center + scale * torch.randn(post.d, generator=g, dtype=post.dtype) for _ in range(k)
    ]


def _log_joint(model, sites):
    tr = poutine.trace(poutine.condition(model, data=sites)).get_trace()
    return tr.log_prob_sum()


def test_model_form_equals_potential_form():
    net = _mlp()
    x, y = _data()
    post = _declared(net, x, y)
    for w in _random_ws(post):
        lj = _log_joint(post.model, post.flat_to_sites(w))
        ld = post.log_density(w)
        assert torch.allclose(lj, ld, rtol=1e-6, atol=0), (float(lj), float(ld))


def _independent_log_density(net, x, y, w_named, center_named, nbeta, gamma, probes, consts):
    """log p computed by hand, without condpost."""
    from torch.func import functional_call

    params = dict(net.named_parameters())
    params.update(w_named)
    n = x.shape[0]
    logits = functional_call(net, params, (x,))
    nll = -torch.log_softmax(logits, -1)[torch.arange(n), y]
    lp = -nbeta * nll.mean()
    d = 0
    for k, v in w_named.items():
        lp = lp - 0.5 * gamma * ((v - center_named[k]) ** 2).sum()
        d += v.numel()
    lp = lp + 0.5 * d * math.log(gamma / (2 * math.pi))
    h = functional_call(
        net[:2], {k[0:]: v for k, v in params.items() if k.startswith("0.")}, (probes,)
    )
    h_star = net[:2](probes)
    lp = lp - ((h - h_star) ** 2).sum() / (2 * consts["sig1"] ** 2)
    out = functional_call(net, params, (probes,))
    out_star = net(probes)
    lp = lp - nbeta * consts["alpha"] * ((out - out_star) ** 2).mean()
    W2 = w_named.get("2.weight", params["2.weight"])
    mask = net[2].weight.abs() < 0.1
    lp = lp - ((W2 - net[2].weight)[mask] ** 2).sum() / (2 * 0.05**2)
    return lp


def test_potential_matches_independent_formula():
    net = _mlp()
    x, y = _data()
    post = _declared(net, x, y)
    center = {k: v.detach().clone() for k, v in net.named_parameters()}
    with torch.no_grad():
        for w in _random_ws(post, k=5):
            named = post.lifted.unflatten(w)
            ref = _independent_log_density(
                net, x, y, named, center, 25.0, 3.0, x[:5], {"sig1": 0.2, "alpha": 0.5}
            )
            assert torch.allclose(post.log_density(w), ref, rtol=1e-10)


def test_hand_written_script_equals_declarative():
    """The documented recipe: a Pyro script with cp.lift/capture/temper/preserve."""
    net = _mlp()
    x, y = _data()
    n = x.shape[0]
    probes = x[:5]
    post = _declared(net, x, y, include=["2.*", "0.weight"])
    with cp.capture(net, ["1", "2"]) as acts_star, torch.no_grad():
        net(probes)
    mask = net[2].weight.detach().abs() < 0.1

    def model():
        f = cp.lift("net", net, localization=3.0, include=["2.*", "0.weight"])
        logits = f(x)
        with cp.temper(nbeta=25.0, n=n), pyro.plate("data", n):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        with cp.capture(f, ["1", "2"]) as acts:
            f(probes)
        cp.preserve("activations:1", acts["1"], acts_star["1"], tolerance=0.2)
        cp.preserve("logits-rel", acts["2"], acts_star["2"], strength=0.5, nbeta=25.0)
        w2 = f.params["2.weight"]
        cp.preserve("zero_pattern:2.weight", w2[mask], net[2].weight.detach()[mask], tolerance=0.05)

    for w in _random_ws(post):
        sites = post.flat_to_sites(w)
        lj_hand = _log_joint(model, sites)
        lj_decl = _log_joint(post.model, sites)
        assert torch.allclose(lj_hand, post.log_density(w), rtol=1e-6)
        assert torch.allclose(lj_hand, lj_decl, rtol=1e-12)
        tr = poutine.trace(poutine.condition(model, data=sites)).get_trace()
        assert {"constraint/activations:1", "constraint/logits-rel"} <= set(tr.nodes)


def test_temper_scales_only_the_likelihood():
    def model(use_temper):
        ctx = cp.temper(nbeta=10.0, n=4) if use_temper else poutine.scale(scale=1.0)
        with ctx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))  # latent: never scaled by temper
            with pyro.plate("data", 4):
                pyro.sample("y", dist.Normal(z, 1.0), obs=torch.zeros(4))
            cp.preserve("c", z.reshape(1), torch.zeros(1), tolerance=0.5)  # constraint: not scaled

    tr_t = poutine.trace(
        poutine.condition(lambda: model(True), {"z": torch.tensor(0.3)})
    ).get_trace()
    tr_0 = poutine.trace(
        poutine.condition(lambda: model(False), {"z": torch.tensor(0.3)})
    ).get_trace()
    tr_t.compute_log_prob()
    tr_0.compute_log_prob()
    assert torch.allclose(tr_t.nodes["z"]["log_prob_sum"], tr_0.nodes["z"]["log_prob_sum"])
    assert torch.allclose(tr_t.nodes["constraint/c"]["log_prob_sum"], torch.tensor(-0.09 / 0.5))
    assert torch.allclose(
        tr_t.nodes["y"]["log_prob_sum"], 2.5 * tr_0.nodes["y"]["log_prob_sum"]
    )  # β = nβ/n = 10/4


def test_temper_composes_with_poutine_scale_and_wbic():
    def model():
        with poutine.scale(scale=2.0), cp.temper("wbic", n=50):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=torch.tensor(1.0))

    tr = poutine.trace(model).get_trace()
    tr.compute_log_prob()
    expected = 2.0 * (1 / math.log(50)) * dist.Normal(0.0, 1.0).log_prob(torch.tensor(1.0))
    assert torch.allclose(tr.nodes["y"]["log_prob_sum"], expected)


def test_lift_sites_and_frozen_parameters_are_constants():
    net = _mlp()
    x, _ = _data()
    before = [p.detach().clone() for p in net.parameters()]

    def model():
        f = cp.lift("net", net, localization=4.0, include="2.*")
        return f(x)

    tr = poutine.trace(model).get_trace()
    names = [n for n, s in tr.nodes.items() if s["type"] == "sample"]
    assert names == ["net.2.weight", "net.2.bias"]
    assert not any(s["type"] == "param" for s in tr.nodes.values())
    site = tr.nodes["net.2.weight"]
    assert torch.allclose(site["fn"].base_dist.scale, torch.full((4, 8), 0.5, dtype=torch.float64))
    assert torch.equal(site["fn"].base_dist.loc, net[2].weight.detach())
    # blocking hides the lifted sites from an outer trace, as with any Pyro site
    tr_b = poutine.trace(poutine.block(model, hide=["net.2.weight"])).get_trace()
    assert "net.2.weight" not in tr_b.nodes and "net.2.bias" in tr_b.nodes
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, b)


def test_init_to_center_clones_and_nuts_starts_at_center():
    net = _mlp()
    x, y = _data(n=30)
    n = x.shape[0]

    def model():
        f = cp.lift("net", net, localization=10.0, include="2.bias")
        with cp.temper(nbeta=5.0, n=n), pyro.plate("data", n):
            pyro.sample("y", dist.Categorical(logits=f(x)), obs=y)

    init = cp.init_to_center(net)
    tr = poutine.trace(model).get_trace()
    v = init(tr.nodes["net.2.bias"])
    assert torch.equal(v, net[2].bias.detach())
    assert v.data_ptr() != net[2].bias.data_ptr()
    kernel = pyro.infer.NUTS(model, init_strategy=cp.init_to_center())
    kernel.setup(warmup_steps=0)
    assert torch.equal(kernel.initial_params["net.2.bias"], net[2].bias.detach())
    mcmc = pyro.infer.MCMC(
        pyro.infer.NUTS(model, init_strategy=cp.init_to_center()),
        num_samples=20,
        warmup_steps=20,
        disable_progbar=True,
    )
    mcmc.run()
    assert mcmc.get_samples()["net.2.bias"].shape == (20, 4)


def test_capture_records_sites_and_validates():
    net = _mlp()
    x, _ = _data()
    with cp.capture(net, ["0", "1"]) as acts:
        net(x)
    assert acts["0"].shape == (60, 8)
    assert torch.allclose(acts["1"], torch.tanh(acts["0"]))
    assert not net[0]._forward_hooks  # hooks removed
    with pytest.raises(ValueError, match="Nearest sites"):
        with cp.capture(net, ["layers.1"]):
            pass


def test_preserve_argument_errors():
    with pytest.raises(ValueError, match="exactly one of tolerance"):
        cp.preserve("c", torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="needs nbeta"):
        cp.preserve("c", torch.zeros(2), torch.zeros(2), strength=1.0)
    with pytest.raises(ValueError, match="temper needs n"):
        cp.temper(10.0)
    with pytest.raises(ValueError, match="positive"):
        cp.temper(-1.0, n=10)
    with pytest.raises(ValueError, match="localization"):
        cp.lift("net", _mlp(), localization=0.0)


def test_model_form_nuts_agrees_with_potential_nuts():
    """Pyro NUTS on post.model (per-parameter sites) and on the potential form agree."""
    net = torch.nn.Linear(2, 1).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 2, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-0.5]], dtype=torch.float64) + 0.3 * torch.randn(
        80, 1, generator=g, dtype=torch.float64
    )
    with torch.no_grad():
        sol = torch.linalg.lstsq(
            torch.cat([x, torch.ones(80, 1, dtype=torch.float64)], 1), y
        ).solution
        net.weight.copy_(sol[:2].T)
        net.bias.copy_(sol[2])
    post = cp.LocalPosterior(net, (x, y), cp.Gaussian(scale=0.3), localization=1.0)
    mcmc = pyro.infer.MCMC(
        pyro.infer.NUTS(post.model, init_strategy=cp.init_to_center()),
        num_samples=1500,
        warmup_steps=300,
        disable_progbar=True,
    )
    mcmc.run()
    s = mcmc.get_samples()
    w_model = torch.cat(
        [s["net.weight"].reshape(1500, -1), s["net.bias"].reshape(1500, -1)], 1
    ).numpy()
    ref = post.sample("nuts", chains=1, warmup=300, draws=1500, seed=0, progress=False)
    w_pot = ref.flat()[0]
    se = np.sqrt(w_model.var(0) / 700 + w_pot.var(0) / 700)  # conservative ESS ≥ 700 each
    assert np.all(np.abs(w_model.mean(0) - w_pot.mean(0)) < 4 * se)
    assert np.allclose(w_model.std(0), w_pot.std(0), rtol=0.15)
