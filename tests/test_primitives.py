"""Pyro primitives: exact log-joint parity with the declarative API and handler semantics."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from analytic import linear_net, make_problem
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


# ---------------------------------------------------------------- vectorized Pyro inference
def _hand_model(net, x, y, probes, target, include=None):
    n = x.shape[0]

    def model():
        f = cp.lift("net", net, localization=3.0, include=include)
        with cp.capture(f, ["1"]) as acts:
            f(probes)
        logits = f(x)
        pyro.deterministic("logits", logits)
        pyro.deterministic("hidden", acts["1"])
        with cp.temper(nbeta=25.0, n=n), pyro.plate("data", n):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)
        pyro.deterministic("log_factor", cp.preserve("h", acts["1"], target, tolerance=0.2))

    return model


def test_predictive_parallel_equals_sequential():
    net = _mlp()
    x, y = _data()
    probes = x[:5]
    with torch.no_grad(), cp.capture(net, ["1"]) as st:
        net(probes)
    model = _hand_model(net, x, y, probes, st["1"])
    g = torch.Generator().manual_seed(3)
    S = 6
    samples = {
        f"net.{k}": p.detach() + 0.2 * torch.randn(S, *p.shape, generator=g, dtype=p.dtype)
        for k, p in net.named_parameters()
    }
    sites = ["logits", "hidden", "log_factor"]
    seq = pyro.infer.Predictive(model, posterior_samples=samples, return_sites=sites)()
    par = pyro.infer.Predictive(
        model, posterior_samples=samples, return_sites=sites, parallel=True
    )()
    for k in sites:
        assert torch.allclose(par[k].reshape(seq[k].shape), seq[k], rtol=1e-12, atol=1e-12), k
    # and the sequential values are the network at each sampled weight
    for s in range(S):
        params = {k[len("net.") :]: v[s] for k, v in samples.items()}
        logits = torch.func.functional_call(net, params, (x,))
        assert torch.allclose(seq["logits"][s].reshape(logits.shape), logits, rtol=1e-12)


class _Temperature(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)
        self.t = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.lin(x) / self.t


def test_predictive_parallel_with_a_zero_dim_parameter():
    """Pyro pads a 0-d site to [S, 1] but a matrix site not at all: both batch as [S]."""
    torch.manual_seed(0)
    net = _Temperature().double()
    x, _ = _data()

    def model():
        pyro.deterministic("out", cp.lift("net", net, localization=1.0)(x))

    g = torch.Generator().manual_seed(0)
    samples = {
        f"net.{k}": p.detach() + 0.1 * torch.randn(4, *p.shape, generator=g, dtype=p.dtype)
        for k, p in net.named_parameters()
    }
    seq = pyro.infer.Predictive(model, posterior_samples=samples, return_sites=["out"])()
    par = pyro.infer.Predictive(
        model, posterior_samples=samples, return_sites=["out"], parallel=True
    )()
    assert torch.allclose(par["out"].reshape(seq["out"].shape), seq["out"], rtol=1e-12)


def test_vectorized_particles_elbo_equals_log_density():
    """With a point-mass guide every particle is the same: the vectorized ELBO is exact."""
    from pyro.infer.autoguide import AutoDelta, AutoNormal

    net = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = torch.randn(30, 2, generator=g, dtype=torch.float64)
    post = cp.LocalPosterior(
        net, (x, y), cp.Gaussian(scale=0.5), nbeta=10.0, localization=2.0, check_center=False
    )
    post.preserve(cp.Activations("1", x[:5], tolerance=0.2))
    post.preserve(cp.Activations("2", x[:5], strength=0.5, name="rel"))
    post.preserve(cp.WeightZeroPattern("2.weight", threshold=0.1, tolerance=0.05))
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoDelta(post.model, init_loc_fn=cp.init_to_center())
    seq = pyro.infer.Trace_ELBO().loss(post.model, guide)
    vec = pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True).loss(post.model, guide)
    med = guide.median()
    w = torch.cat([med[f"net.{k}"].reshape(-1) for k in post.lifted.names])
    assert math.isclose(seq, -float(post.log_density(w)), rel_tol=1e-10)
    assert math.isclose(vec, seq, rel_tol=1e-10)
    # a hand-written model: its preserve factor is one per particle, on the particle plate
    x4, y4 = _data(n=30)
    model = _hand_model(_mlp(), x4, y4, x4[:5], torch.zeros(5, 8, dtype=torch.float64))
    pyro.clear_param_store()
    delta = AutoDelta(model, init_loc_fn=cp.init_to_center())
    seq = pyro.infer.Trace_ELBO().loss(model, delta)
    vec = pyro.infer.Trace_ELBO(num_particles=5, vectorize_particles=True).loss(model, delta)
    assert math.isclose(vec, seq, rel_tol=1e-10)
    pyro.clear_param_store()
    svi = pyro.infer.SVI(
        model,
        AutoNormal(model, init_scale=0.05),
        pyro.optim.Adam({"lr": 0.01}),
        pyro.infer.Trace_ELBO(num_particles=8, vectorize_particles=True),
    )
    losses = [svi.step() for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)


def test_preserve_on_unaffected_site_raises_like_declarative():
    net = _mlp()
    x, y = _data()
    probes = x[:5]
    with torch.no_grad(), cp.capture(net, ["1"]) as st:
        net(probes)
    # only the last layer is lifted: the hidden layer "1" does not depend on it
    model = _hand_model(net, x, y, probes, st["1"], include="2.*")
    with pytest.raises(ValueError, match="does not depend on any lifted parameter|does not depend"):
        poutine.trace(model).get_trace()
    post = cp.LocalPosterior(
        net, (x, y), cp.Categorical(), localization=3.0, include="2.*", check_center=False
    )
    with pytest.raises(ValueError, match="does not depend on any lifted parameter"):
        post.preserve(cp.Activations("1", probes, tolerance=0.2))

    # a derived constant, while the lifted weights are being differentiated (NUTS, SVI)
    def model2():
        f = cp.lift("net", net, localization=3.0, include="2.*")
        with cp.capture(f, ["1"]) as acts:
            f(probes)
        cp.preserve("h2", 2.0 * acts["1"], 2.0 * st["1"], tolerance=0.2)

    sites = {
        k: v.detach().clone().requires_grad_(True)
        for k, v in post.flat_to_sites(post.center).items()
    }
    with pytest.raises(ValueError, match=r"cp\.preserve\('h2'\).*no gradient path"):
        poutine.trace(poutine.condition(model2, data=sites)).get_trace()
    # the site downstream of the lifted weights is accepted
    model_ok = _hand_model(net, x, y, probes, st["1"], include="0.*")
    poutine.trace(model_ok).get_trace()


def _linear_gaussian_pyro(prob, name="w", nbeta=None):
    net = linear_net(prob)

    def model():
        f = cp.lift(name, net, localization=prob.gamma)
        with cp.temper(nbeta=prob.nbeta if nbeta is None else nbeta, n=prob.n):
            with pyro.plate("data", prob.n):
                pyro.sample("y", dist.Normal(f(prob.X), prob.s).to_event(1), obs=prob.Y)

    return net, model


def test_from_pyro_matches_closed_form():
    prob = make_problem(n=100, din=3, k=2, s=0.5, gamma=1.0, seed=0)
    net, model = _linear_gaussian_pyro(prob)
    post = cp.LocalPosterior(
        net, (prob.X, prob.Y), cp.Gaussian(scale=prob.s), nbeta=prob.nbeta, localization=1.0
    )
    pyro.set_rng_seed(0)
    mcmc = pyro.infer.MCMC(
        pyro.infer.NUTS(model, init_strategy=cp.init_to_center()),
        num_samples=1500,
        warmup_steps=300,
        disable_progbar=True,
    )
    mcmc.run()
    ref = cp.ReferenceClass.from_pyro(mcmc, post)
    assert ref.flat().shape == (1, 1500, post.d)
    assert ref.settings["method"] == "pyro-mcmc:nuts" and ref.settings["lift_name"] == "w"
    assert not ref.diverging.any()
    mu, Sigma = prob.posterior()
    W = ref.flat()[0]
    se = np.sqrt(np.diag(Sigma) / 500)  # NUTS on a Gaussian: ESS ≥ 500 of 1500 draws
    assert np.all(np.abs(W.mean(0) - mu) < 4 * se), (W.mean(0) - mu) / se
    assert np.allclose(np.cov(W.T), Sigma, atol=0.2 * np.diag(Sigma).max())
    lam = ref.llc()
    assert abs(lam.mean - prob.expected_nbeta_dL()) < 4 * lam.stderr + 0.05
    # the same draws under the declaration's torch evaluation: L_n per draw is exact
    assert np.allclose(ref.loss()[0, :5], [prob.nbeta_L(w) / prob.nbeta for w in W[:5]])

    # another posterior (twice the nβ) is refused, as is another lifted set
    _, other = _linear_gaussian_pyro(prob, nbeta=2 * prob.nbeta)
    mcmc2 = pyro.infer.MCMC(
        pyro.infer.NUTS(other, init_strategy=cp.init_to_center()),
        num_samples=10,
        warmup_steps=10,
        disable_progbar=True,
    )
    mcmc2.run()
    with pytest.raises(ValueError, match="not this declaration's posterior"):
        cp.ReferenceClass.from_pyro(mcmc2, post)
    post_b = cp.LocalPosterior(
        torch.nn.Linear(3, 2).double(),
        (prob.X, prob.Y),
        cp.Gaussian(scale=prob.s),
        localization=1.0,
        check_center=False,
    )
    with pytest.raises(ValueError, match="cannot tell which sites"):
        cp.ReferenceClass.from_pyro(mcmc, post_b)
