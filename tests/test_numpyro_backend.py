"""The NumPyro backend (``backend="numpyro"``) against docs/theory.md §4.1/§4.2 ground truth.

The same checks, with the same tolerances, as the Pyro backend's tests
(tests/test_linear_gaussian.py, tests/test_llc_regular.py): Monte Carlo standard errors
from ArviZ's ESS, an implementation independent of condpost's. Compiled programs are
cached per declaration, so the runs in this module that share a declaration and kernel
settings (differing only in seed or draws) compile once.
"""

import math

import arviz as az
import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem, whitened_problem
from test_linear_gaussian import _declare, check_exact_posterior

import condpost as cp

jax = pytest.importorskip("jax")
pytest.importorskip("numpyro")

RUN = dict(chains=4, warmup=300, seed=3, progress=False, backend="numpyro")


@pytest.fixture(scope="module")
def constrained():
    """docs/theory.md §4.1 at a perturbed w* with both linear-Gaussian constraints."""
    prob = make_problem(seed=1, perturb=0.05)
    w0 = prob.w_star.copy()
    net, post = _declare(prob, True)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    ref = post.sample("nuts", draws=1600, **RUN)
    return prob, w0, net, before, post, ref


def test_exact_posterior_perturbed_constrained(constrained):
    prob, w0, net, before, post, ref = constrained
    check_exact_posterior(prob, ref)
    assert np.array_equal(prob.w_star, w0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.slow
@pytest.mark.parametrize(
    "constrained_,perturb",
    [(False, 0.0), (True, 0.0), (False, 0.05)],
    ids=["ols-unconstrained", "ols-constrained", "perturbed-unconstrained"],
)
def test_exact_posterior_other_cases(constrained_, perturb):
    prob = make_problem(seed=1, perturb=perturb)
    _, post = _declare(prob, constrained_)
    check_exact_posterior(prob, post.sample("nuts", draws=1600, **RUN))


def test_result_contract(constrained, tmp_path):
    """Same ReferenceClass as the Pyro backend: settings, sampler stats, analyses, save/load."""
    prob, _, _, _, post, ref = constrained
    s = ref.settings
    assert s["backend"] == "numpyro" and s["method"] == "nuts"
    assert s["chain_method"] == ("parallel" if len(jax.devices()) >= 4 else "vectorized")
    assert s["x64"] is True and ref.flat().dtype == np.float64
    assert s["export_time_s"] > 0 and s["compile_time_s"] > 0 and s["run_time_s"] > 0
    steps = ref.stat("sampler/num_steps")
    assert steps.shape == (4, 1600) and steps.min() >= 1
    # every leapfrog step is one gradient; warmup steps are counted too (≥ one per iteration)
    assert s["gradient_evaluations"] >= steps.sum() + 4 * 300
    assert ref.diverging.shape == (4, 1600)
    assert np.all(ref.stat("sampler/step_size") > 0)
    assert np.all(ref.flat()[:, 0] != post.center.numpy())  # it moved away from w*
    summ = ref.summary(warn_user=False)
    assert summ.divergences == int(ref.diverging.sum())
    assert abs(summ.virial_ratio - 1) < 4 * summ.virial_stderr + 0.02
    rep = ref.preservation(warn_user=False)
    assert len(rep) == 2
    path = ref.save(tmp_path / "run.npz")
    back = cp.ReferenceClass.load(path, posterior=post)
    np.testing.assert_array_equal(back.flat(), ref.flat())
    np.testing.assert_array_equal(back.stat("sampler/num_steps"), steps)
    assert back.settings["backend"] == "numpyro"
    assert back.llc(warn_user=False).mean == pytest.approx(ref.llc(warn_user=False).mean)
    idata = ref.to_arviz()
    assert idata.sample_stats["diverging"].shape == (4, 1600)


def test_same_seed_same_draws(constrained):
    """Reuses the fixture's compiled program (same declaration and kernel settings)."""
    from condpost.infer.base import chain_seeds

    *_, post, _ = constrained
    kw = dict(RUN, seed=11, draws=50)
    a = post.sample("nuts", **kw)
    b = post.sample("nuts", **dict(kw, progress=True))
    c = post.sample("nuts", **dict(kw, seed=12))
    for r in (a, b, c):  # the fixture's export and compiled program were reused
        assert r.settings["compile_cached"] and r.settings["export_cached"]
    np.testing.assert_array_equal(a.flat(), b.flat())
    np.testing.assert_array_equal(a.stat("sampler/num_steps"), b.stat("sampler/num_steps"))
    assert not np.array_equal(a.flat(), c.flat())
    assert a.settings["chain_seeds"] == chain_seeds(11, 4)


def test_divergences_are_kept_flagged_and_counted():
    """HMC with a step size far too large: every draw diverges, none is dropped. With fixed
    L leapfrog steps the gradient count is exactly (warmup + draws)·L + 1 per chain."""
    prob = make_problem(seed=1)
    _, post = _declare(prob, False)
    with pytest.warns(cp.SamplerWarning) as rec:
        ref = post.sample(
            "hmc",
            backend="numpyro",
            chains=2,
            warmup=10,
            draws=30,
            seed=0,
            progress=False,
            step_size=5.0,
            num_steps=4,
            adapt_step_size=False,
            adapt_mass_matrix=False,
            chain_method="sequential",
        )
    msgs = " ".join(str(r.message) for r in rec)
    assert "warmup=10 is very short" in msgs and "60 divergent" in msgs
    assert ref.flat().shape == (2, 30, prob.d) and ref.diverging.all()
    assert ref.settings["gradient_evaluations"] == 2 * ((10 + 30) * 4 + 1)
    assert ref.summary(warn_user=False).divergences == 60


GAMMA_TABLE = {1.0: 2.9794, 10.0: 2.8062, 100.0: 1.7743}  # docs/theory.md §4.2


@pytest.mark.parametrize(
    "gamma", [pytest.param(g, marks=() if g == 100.0 else pytest.mark.slow) for g in GAMMA_TABLE]
)
def test_llc_matches_exact_finite_gamma(gamma):
    prob = whitened_problem(gamma=gamma, seed=4)
    post = cp.LocalPosterior(
        linear_net(prob), (prob.X, prob.Y), cp.Gaussian(scale=prob.s), localization=gamma
    )
    assert post.nbeta == pytest.approx(1000 / math.log(1000))
    ref = post.sample(
        "nuts",
        backend="numpyro",
        chains=4,
        warmup=300,
        draws=1000,
        seed=int(gamma * 7) % 97,
        progress=False,
    )
    lam = ref.llc(warn_user=False)
    exact = GAMMA_TABLE[gamma]
    assert prob.expected_nbeta_dL() == pytest.approx(exact, abs=1e-4)
    per_draw = post.nbeta * (ref.loss() - post.loss_center)
    se = per_draw.std() / math.sqrt(float(az.ess(per_draw, method="mean")))
    assert abs(lam.mean - exact) <= 4 * se, (lam.mean, exact, se)
    assert lam.nbeta == post.nbeta and lam.localization == gamma


@pytest.mark.parametrize("perturb", [pytest.param(0.0, marks=pytest.mark.slow), 0.05])
def test_svi_mvn_matches_exact_posterior(perturb):
    prob = make_problem(seed=2, perturb=perturb)
    net, post = _declare(prob, True)
    center_before = post.center.clone()
    w_before = net.weight.detach().clone()
    fit = post.fit("svi", backend="numpyro", guide="mvn", steps=4000, lr=0.02, progress=False)
    mu, Sigma = prob.posterior()
    m = fit.mean.detach().numpy()
    S = fit.covariance().detach().numpy()
    rel_mean = np.abs(m - mu) / np.sqrt(np.diag(Sigma))
    rel_cov = np.linalg.norm(S - Sigma) / np.linalg.norm(Sigma)
    assert rel_mean.max() <= 0.03, rel_mean
    assert rel_cov <= 0.03, rel_cov
    assert torch.equal(post.center, center_before)
    assert torch.equal(net.weight.detach(), w_before)
    assert fit.settings["backend"] == "numpyro" and fit.settings["compile_time_s"] > 0
    ref = fit.sample(500, seed=1)
    assert ref.flat().shape == (1, 500, prob.d)


@pytest.mark.slow
@pytest.mark.parametrize("guide", ["normal", "lowrank"])
def test_svi_other_guides_match_pyro_fixed_points(guide):
    """Mean-field and low-rank fits: the same optimum as the Pyro side's guides."""
    prob = make_problem(seed=2, perturb=0.05)
    _, post = _declare(prob, True)
    a = post.fit("svi", backend="numpyro", guide=guide, steps=4000, lr=0.02, progress=False)
    b = post.fit("svi", guide=guide, steps=4000, lr=0.02, progress=False)
    sd = np.sqrt(np.diag(prob.posterior()[1]))
    assert np.max(np.abs(a.mean.numpy() - b.mean.detach().numpy()) / sd) < 0.05
    if guide == "normal":  # the mean-field optimum is unique: diag(Σ⁻¹)⁻¹
        P = np.linalg.inv(prob.posterior()[1])
        np.testing.assert_allclose(np.diag(a.covariance().numpy()), 1 / np.diag(P), rtol=0.05)


@pytest.mark.parametrize("backend", ["pyro", "numpyro"])
def test_svi_lowrank_default_rank_is_shared(backend):
    """Both executors' low-rank guides default to default_rank(d) = ⌈√d⌉ (here 3 for d = 6,
    where NumPyro's own default, round(√d), would give 2)."""
    from condpost.infer.base import default_rank

    prob = make_problem(seed=1)
    _, post = _declare(prob, False)
    fit = post.fit("svi", backend=backend, guide="lowrank", steps=5, average=0.0, progress=False)
    r = default_rank(post.d)
    assert post.d == 6 and r == 3
    assert fit.settings["rank"] == r
    q = fit.distribution
    assert isinstance(q, torch.distributions.LowRankMultivariateNormal)
    assert q.cov_factor.shape == (post.d, r)
    assert q.loc.dtype == post.dtype and q.loc.device == post.center.device


def test_svi_unknown_option_did_you_mean():
    from condpost.infer.numpyro_svi import run_numpyro_svi

    prob = make_problem(seed=1)
    _, post = _declare(prob, False)
    with pytest.raises(TypeError, match="did you mean 'num_particles'"):
        post.fit("svi", backend="numpyro", num_particle=2)
    with pytest.raises(TypeError, match="did you mean 'lr_decay'"):
        run_numpyro_svi(post, lr_decy=0.1)


@pytest.mark.slow
def test_float32_run_and_block_size_invariance():
    prob = make_problem(seed=1)
    _, post = _declare(prob, False)
    kw = dict(RUN, draws=1600, chain_method="sequential", x64=False)
    ref = post.sample("nuts", **kw)
    assert ref.settings["x64"] is False
    check_exact_posterior(prob, ref)
    a = post.sample("nuts", **dict(kw, draws=40, block_size=7))
    b = post.sample("nuts", **dict(kw, draws=40, block_size=13))
    np.testing.assert_array_equal(a.flat(), b.flat())


def test_bad_options_raise_clear_errors():
    prob = make_problem(seed=1)
    _, post = _declare(prob, False)
    with pytest.raises(TypeError, match="target_accept"):
        post.sample("nuts", backend="numpyro", target_acept=0.9)
    with pytest.raises(ValueError, match="devices"):
        post.sample("nuts", backend="numpyro", chains=64, chain_method="parallel")
    with pytest.raises(ValueError, match="chain_method"):
        post.sample("nuts", backend="numpyro", chain_method="threads")
    with pytest.raises(ValueError, match="num_threads"):  # torch threads, on every executor
        post.sample("nuts", backend="numpyro", num_threads=0)
    with pytest.raises(TypeError, match="x64"):
        post.sample("nuts", backend="numpyro", x64="yes")
    with pytest.raises(ValueError, match="guide"):
        post.fit("svi", backend="numpyro", guide="flow")
    with pytest.raises(TypeError, match="unknown option"):
        post.fit("svi", backend="numpyro", step=10)


@pytest.mark.slow
def test_parallel_chains_equal_sequential_chains():
    """chain_method='parallel' (pmap, one chain per device; 2 CPU devices forced in a
    subprocess) gives the same draws, bit for bit, as 'sequential'."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import os\n"
        "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'\n"
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import numpy as np\n"
        "from analytic import make_problem\n"
        "from test_linear_gaussian import _declare\n"
        "_, post = _declare(make_problem(seed=1), False)\n"
        "kw = dict(backend='numpyro', chains=2, warmup=200, draws=300, seed=1, progress=False)\n"
        "a = post.sample('nuts', **kw)\n"
        "b = post.sample('nuts', chain_method='sequential', **kw)\n"
        "print(a.settings['chain_method'], np.array_equal(a.flat(), b.flat()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["parallel", "True"], out.stdout + out.stderr


class _BranchyNet(torch.nn.Module):
    """A Python branch on a tensor value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, x):
        h = self.lin(x)
        return h * 2 if float(h.detach().sum()) > 1e9 else h


def test_default_nuts_falls_back_to_pyro_when_the_model_does_not_export(capsys):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = torch.randn(30, 1, generator=g, dtype=torch.float64)
    post = cp.LocalPosterior(
        _BranchyNet().double(),
        (x, y),
        cp.Gaussian(scale=1.0),
        localization=1.0,
        check_center=False,
    )
    from condpost.export import ExportError, to_jax

    with pytest.raises(ExportError, match="could not trace"):
        to_jax(post)
    for i in range(2):  # the second call uses the remembered reason
        if i == 0:  # vmap cannot batch it either: one warning, then draw by draw
            with pytest.warns(cp.CondpostWarning, match="draw by draw"):
                ref = post.sample("nuts", chains=1, warmup=60, draws=20, progress=False)
        else:
            ref = post.sample("nuts", chains=1, warmup=60, draws=20, progress=False)
        assert ref.settings["backend"] == "pyro"
        assert "does not export to JAX" in ref.settings["backend_note"]
    assert capsys.readouterr().out.count("running on Pyro, not NumPyro") == 2
