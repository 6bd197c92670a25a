"""condpost.jax: lift/temper/preserve/capture/init_to_center for NumPyro models in JAX.

Ground truth: the log joint of docs/theory.md §1.2 written out by hand with NumPy, and the torch
declarative API (``LocalPosterior.log_density``) on the same linear model, at random
weights, in float64 (agreement to rounding, ~1e-12 relative).
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem

import condpost as cp

jax = pytest.importorskip("jax")
numpyro = pytest.importorskip("numpyro")
import jax.numpy as jnp  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
from numpyro import handlers  # noqa: E402
from numpyro.infer.util import initialize_model, log_density  # noqa: E402

import condpost.jax as cpj  # noqa: E402

SIG_A, ALPHA = 0.1, 0.3


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _setup():
    prob = make_problem(seed=1, perturb=0.05)
    g = torch.Generator().manual_seed(5)
    probes = torch.randn(2, prob.din, generator=g, dtype=torch.float64)
    probes2 = torch.randn(3, prob.din, generator=g, dtype=torch.float64)
    return prob, probes, probes2


def _torch_post(prob, probes, probes2):
    post = cp.LocalPosterior(
        linear_net(prob),
        (prob.X, prob.Y),
        cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )
    post.preserve(cp.Activations("", probes, tolerance=SIG_A, name="out"))
    post.preserve(cp.Activations("", probes2, strength=ALPHA, name="rel"))
    return post


def _numpyro_model(prob, probes, probes2):
    X, Y = jnp.asarray(prob.X.numpy()), jnp.asarray(prob.Y.numpy())
    P1, P2 = jnp.asarray(probes.numpy()), jnp.asarray(probes2.numpy())
    params = {"weight": jnp.asarray(prob.w_star.reshape(prob.k, prob.din))}
    n = X.shape[0]

    def forward(p, x):
        return cpj.site("out", x @ p["weight"].T)

    t1, t2 = forward(params, P1), forward(params, P2)

    def model():
        p = cpj.lift("net", params, localization=prob.gamma)
        out = forward(p, X)
        with cpj.capture(["out"]) as a1:
            forward(p, P1)
        with cpj.capture("out") as a2:
            forward(p, P2)
        with cpj.temper(prob.nbeta, n=n), numpyro.plate("data", n):
            numpyro.sample("y", dist.Normal(out, prob.s).to_event(1), obs=Y)
        cpj.preserve("out", a1["out"], t1, tolerance=SIG_A)
        cpj.preserve("rel", a2["out"], t2, strength=ALPHA, nbeta=prob.nbeta)

    return model


def _hand_log_joint(prob, probes, probes2, w):
    """−U(w) + (d/2) log(γ/2π), docs/theory.md §1.2, in NumPy."""
    d = prob.d
    W, Ws = w.reshape(prob.k, prob.din), prob.w_star.reshape(prob.k, prob.din)
    prior = -0.5 * prob.gamma * np.sum((w - prob.w_star) ** 2) + 0.5 * d * math.log(
        prob.gamma / (2 * math.pi)
    )
    lik = -prob.nbeta_L(w)
    P1, P2 = probes.numpy(), probes2.numpy()
    f1 = -np.sum((P1 @ W.T - P1 @ Ws.T) ** 2) / (2 * SIG_A**2)
    f2 = -prob.nbeta * ALPHA * np.mean((P2 @ W.T - P2 @ Ws.T) ** 2)
    return prior + lik + f1 + f2


def test_log_joint_matches_hand_computation_and_torch_declaration():
    prob, probes, probes2 = _setup()
    post = _torch_post(prob, probes, probes2)
    model = _numpyro_model(prob, probes, probes2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        w = prob.w_star + 0.2 * rng.standard_normal(prob.d)
        lj, tr = log_density(model, (), {}, {"net.weight": jnp.asarray(w.reshape(prob.k, -1))})
        hand = _hand_log_joint(prob, probes, probes2, w)
        torch_lj = float(post.log_density(torch.as_tensor(w)))
        assert float(lj) == pytest.approx(hand, rel=1e-12, abs=1e-9)
        assert float(lj) == pytest.approx(torch_lj, rel=1e-12, abs=1e-9)
    assert [k for k, v in tr.items() if v["type"] == "sample"] == [
        "net.weight",
        "y",
        "constraint/out",
        "constraint/rel",
    ]


def test_temper_scales_only_observed_non_constraint_sites():
    """Prior and constraint factors inside ``temper`` stay unscaled; the likelihood and a
    plain ``numpyro.factor`` are scaled by β = nβ/n (the Pyro side's semantics)."""
    nb, n, gamma = 7.0, 20, 4.0
    x = jnp.linspace(-1, 1, n)
    y = 0.3 * x
    w0 = jnp.asarray(0.25)

    def model():
        with cpj.temper(nbeta=nb, n=n):
            p = cpj.lift("m", {"a": w0}, localization=gamma)
            with numpyro.plate("data", n):
                numpyro.sample("y", dist.Normal(p["a"] * x, 0.5), obs=y)
            cpj.preserve("c", log_factor=-3.0 * (p["a"] - w0) ** 2)
            numpyro.factor("user", -2.0 * p["a"] ** 2)

    a = 0.4
    tr = handlers.trace(handlers.substitute(model, {"m.a": jnp.asarray(a)})).get_trace()
    assert tr["m.a"]["scale"] is None
    assert tr["constraint/c"]["scale"] is None
    assert tr["y"]["scale"] == pytest.approx(nb / n)
    assert tr["user"]["scale"] == pytest.approx(nb / n)
    lj, _ = log_density(model, (), {}, {"m.a": jnp.asarray(a)})
    ll = np.sum(
        -0.5 * ((np.asarray(y) - a * np.asarray(x)) / 0.5) ** 2
        - math.log(0.5 * math.sqrt(2 * math.pi))
    )
    prior = -0.5 * gamma * (a - 0.25) ** 2 + 0.5 * math.log(gamma / (2 * math.pi))
    hand = prior + nb / n * ll - 3.0 * (a - 0.25) ** 2 + nb / n * (-2.0 * a**2)
    assert float(lj) == pytest.approx(hand, rel=1e-12)
    # 'wbic' resolves to n/log n; temper composes with numpyro's own scale handler
    assert cpj.temper("wbic", n=n).scale == pytest.approx(1 / math.log(n))
    with handlers.scale(scale=2.0):
        tr2 = handlers.trace(handlers.substitute(model, {"m.a": jnp.asarray(a)})).get_trace()
    assert tr2["y"]["scale"] == pytest.approx(2 * nb / n)
    assert tr2["constraint/c"]["scale"] == pytest.approx(2.0)  # only the outer handler


def test_lift_names_selection_and_constants():
    params = {
        "layers": [
            {"weight": jnp.ones((2, 3)), "bias": jnp.zeros(2)},
            {"weight": jnp.ones((1, 2)), "bias": jnp.zeros(1)},
        ],
        "steps": jnp.arange(3),  # integer leaf: never lifted
        "act": "tanh",  # non-array leaf
    }
    assert cpj.site_names(params) == [
        "layers.0.bias",
        "layers.0.weight",
        "layers.1.bias",
        "layers.1.weight",
    ]

    def model(**kw):
        p = cpj.lift("net", params, localization=100.0, **kw)
        numpyro.deterministic("check", p["layers"][1]["weight"].sum())
        return p

    tr = handlers.trace(handlers.seed(model, 0)).get_trace(include="layers.1")
    lifted = [k for k, v in tr.items() if v["type"] == "sample"]
    assert lifted == ["net.layers.1.bias", "net.layers.1.weight"]
    p = handlers.seed(model, 0)(include="layers.1", exclude="*.bias")
    assert p["layers"][0]["weight"] is params["layers"][0]["weight"]  # constant, untouched
    assert p["layers"][1]["bias"] is params["layers"][1]["bias"]
    assert p["steps"] is params["steps"] and p["act"] == "tanh"
    # site prior: Normal(w*, γ^{-1/2}) with the leaf's shape as event shape
    site = tr["net.layers.1.weight"]
    assert site["fn"].event_shape == (1, 2)
    assert float(site["fn"].base_dist.scale.max()) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="layers.0.weight"):
        handlers.seed(model, 0)(include="layers.0.wieght")
    with pytest.raises(ValueError, match="localization"):
        cpj.lift("net", params, localization=0.0)
    with pytest.raises(ValueError, match="structure"):
        handlers.seed(model, 0)(center={"layers": []})


def test_init_to_center_starts_nuts_at_center():
    params = {"w": jnp.asarray([0.3, -1.2]), "b": jnp.asarray(2.0)}

    def model():
        p = cpj.lift("net", params, localization=1.0)
        numpyro.sample("free", dist.Normal(5.0, 1.0))
        numpyro.sample("obs", dist.Normal(p["w"].sum() + p["b"], 1.0), obs=0.0)

    info = initialize_model(jax.random.PRNGKey(0), model, init_strategy=cpj.init_to_center)
    z = info.param_info.z
    np.testing.assert_array_equal(np.asarray(z["net.w"]), np.asarray(params["w"]))
    assert float(z["net.b"]) == 2.0
    assert abs(float(z["free"]) - 5.0) < 3.0  # the fallback (median) for other sites
    with pytest.raises(ValueError, match="free"):
        initialize_model(
            jax.random.PRNGKey(0), model, init_strategy=cpj.init_to_center(fallback=None)
        )


def test_capture_site_and_errors():
    def forward(x):
        h = cpj.site("hidden", jnp.tanh(x))
        numpyro.deterministic("det", 2 * h)
        return h + 1

    x = jnp.linspace(-1, 1, 4)
    assert np.allclose(forward(x), np.tanh(np.asarray(x)) + 1)  # identity outside capture
    with cpj.capture(["hidden", "det"]) as acts:
        forward(x)
    np.testing.assert_allclose(np.asarray(acts["hidden"]), np.tanh(np.asarray(x)))
    np.testing.assert_allclose(np.asarray(acts["det"]), 2 * np.tanh(np.asarray(x)))
    with pytest.raises(ValueError, match="hidden"):
        with cpj.capture(["hiden"]):
            forward(x)
    # the marker is not a sample site: log densities are unchanged
    tr = handlers.trace(forward).get_trace(x)
    assert not [k for k, v in tr.items() if v["type"] == "sample"]


def test_preserve_argument_errors():
    with pytest.raises(ValueError, match="exactly one"):
        cpj.preserve("a", jnp.ones(2), jnp.zeros(2))
    with pytest.raises(ValueError, match="nbeta"):
        cpj.preserve("a", jnp.ones(2), jnp.zeros(2), strength=1.0)
    with pytest.raises(ValueError, match="shape"):
        cpj.preserve("a", jnp.ones(2), jnp.zeros(3), tolerance=1.0)
    with pytest.raises(ValueError, match="n, the number"):
        cpj.temper(1.0)


def test_import_without_jax_names_the_extra():
    code = "import sys; sys.modules['jax'] = None\ntry:\n    import condpost.jax\nexcept ImportError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install condpost[jax]" in out.stdout
    # (that `import condpost` never imports jax is checked in tests/test_repo.py)


@pytest.mark.slow
def test_numpyro_script_matches_exact_posterior():
    """The primitives' model under NumPyro NUTS samples docs/theory.md §4.1's exact posterior."""
    import arviz as az
    from numpyro.infer import MCMC, NUTS

    prob, probes, probes2 = _setup()
    model = _numpyro_model(prob, probes, probes2)
    mu, Sigma = _exact(prob, probes, probes2)
    mcmc = MCMC(
        NUTS(model, init_strategy=cpj.init_to_center),
        num_warmup=500,
        num_samples=4000,
        num_chains=2,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(0))
    W = np.asarray(mcmc.get_samples(group_by_chain=True)["net.weight"]).reshape(2, 4000, -1)
    ess = np.array([float(az.ess(W[..., i], method="mean")) for i in range(prob.d)])
    se = np.sqrt(np.diag(Sigma)) / np.sqrt(ess)
    assert np.all(np.abs(W.reshape(-1, prob.d).mean(0) - mu) <= 4 * se)


def _exact(prob, probes, probes2):
    """N(μ, Σ) with the two activation constraints as linear-Gaussian factors (§4.1)."""
    C1 = np.kron(np.eye(prob.k), probes.numpy())
    C2 = np.kron(np.eye(prob.k), probes2.numpy())
    k2 = C2.shape[0]
    sig2 = math.sqrt(k2 / (2 * prob.nbeta * ALPHA))  # −nβα·mean(·²) = −‖·‖²/(2σ²)
    prob.constraints = [(C1, C1 @ prob.w_star, SIG_A), (C2, C2 @ prob.w_star, sig2)]
    return prob.posterior()
