"""Many-chain ChEES-HMC (condpost.infer.chees) against docs/theory.md §4.1's exact posterior.

The declaration is the one of tests/test_linear_gaussian.py (bias-free linear layer,
Gaussian likelihood, activation and zero-pattern constraints), so π_C = N(μ, Σ) exactly
(tests/analytic.py). Tolerances are those of the NUTS test: Monte Carlo standard errors
from ArviZ's ESS (an implementation independent of condpost's).

Cost: one export and two compilations (init and one block program) serve every default
test; runs that differ only in seed, draws, warmup or tuning constants reuse them.
"""

import os
import subprocess
import sys
import textwrap

import arviz as az
import numpy as np
import pytest
from analytic import make_problem
from test_linear_gaussian import _declare, _ess, check_exact_posterior

from condpost._errors import SamplerWarning
from condpost.infer.chees import default_superchains, nested_rhat

pytest.importorskip("jax")

CHAINS, WARMUP, DRAWS, BLOCK = 64, 200, 60, 50
RUN = dict(backend="jax", chains=CHAINS, warmup=WARMUP, block_size=BLOCK, progress=False)


@pytest.fixture(scope="module")
def case():
    """The hardest §4.1 case (constraints, w* off the optimum) and one ChEES run."""
    prob = make_problem(seed=1, perturb=0.05)
    w0 = prob.w_star.copy()
    net, post = _declare(prob, True)
    ref = post.sample("chees", draws=DRAWS, seed=3, **RUN)
    return prob, net, post, ref, w0


def test_chees_matches_exact_posterior(case):
    prob, net, post, ref, w0 = case
    assert ref.flat().shape == (CHAINS, DRAWS, prob.d)
    check_exact_posterior(prob, ref, check_stderr=False)
    s = ref.settings
    assert s["method"] == "chees" and s["backend"] == "jax" and s["x64"] is True
    assert s["superchains"] == default_superchains(CHAINS) == 16
    # nested R-hat recorded in the settings equals the diagnostic on the returned draws
    nr = s["nested_rhat"]
    assert nr["L_n"] == pytest.approx(nested_rhat(ref.loss(), 16), rel=1e-12)
    assert nr["worst_weight"] == pytest.approx(np.nanmax(nested_rhat(ref.flat(), 16)))
    assert max(nr["L_n"], nr["worst_weight"]) < 1.01
    st = ref.stat("sampler/num_steps")
    assert st.shape == (CHAINS, DRAWS) and (st >= 1).all()
    assert (st == st[:1]).all()  # all chains integrate the same number of steps
    grads = s["gradient_evaluations"]
    assert grads >= CHAINS * (WARMUP + DRAWS)  # at least one leapfrog step per iteration
    assert ref.diverging.sum() == 0
    # nothing moved w*
    assert np.array_equal(prob.w_star, w0)
    assert np.allclose(net.weight.detach().numpy().ravel(), w0)


def test_same_seed_same_draws(case):
    """Draw s depends only on (seed, chains, warmup, settings): a shorter run with the same
    seed reproduces the first draws exactly, with or without a progress bar; another seed
    does not."""
    prob, _, post, ref, _ = case
    short = post.sample("chees", draws=10, seed=3, **{**RUN, "progress": True})
    assert short.settings["compile_cached"]  # seed and draws reuse the compiled programs
    np.testing.assert_array_equal(short.flat(), ref.flat()[:, :10])
    for k in ("diverging", "accept_prob", "step_size", "num_steps"):
        np.testing.assert_array_equal(
            short.stat(f"sampler/{k}"), ref.stat(f"sampler/{k}")[:, :10], err_msg=k
        )
    other = post.sample("chees", draws=10, seed=4, **RUN)
    assert not np.allclose(other.flat(), short.flat())
    assert short.settings["export_cached"] and other.settings["export_cached"]


def test_divergences_are_counted_and_kept(case):
    """A step size far beyond the posterior scale (SD ≈ 0.05) makes every trajectory blow
    up: each draw is flagged divergent (energy error > 1000 or non-finite), kept, and the
    chains stay at w*."""
    prob, _, post, _, _ = case
    with pytest.warns(SamplerWarning) as rec:
        ref = post.sample(
            "chees",
            draws=10,
            seed=5,
            **{**RUN, "warmup": 0},
            step_size=30.0,
            adapt_step_size=False,
        )
    assert any("divergent transition" in str(w.message) for w in rec)
    assert ref.flat().shape == (CHAINS, 10, prob.d)  # nothing dropped
    assert ref.diverging.all()
    err = ref.stat("sampler/energy_error")
    assert np.all(~np.isfinite(err) | (err > 1000))
    assert np.allclose(ref.flat(), prob.w_star)  # every proposal rejected
    assert ref.stat("sampler/step_size")[0, 0] == pytest.approx(30.0)
    summ = ref.summary(warn_user=False)
    assert summ.divergences == CHAINS * 10


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(chains=1), ValueError, "chains must be an integer ≥ 2"),
        (dict(chains=64, target_accept=1.2), ValueError, "target_accept"),
        (dict(chains=64, superchains=5), ValueError, "superchains=5 must divide chains=64"),
        (dict(chains=64, init_jitter=-1.0), ValueError, "init_jitter"),
        (dict(chains=64, step_sise=0.1), TypeError, "did you mean 'step_size'"),
        (dict(chains=64, warmup_jitter="sobol"), ValueError, "warmup_jitter"),
        (dict(chains=64, max_leapfrog=0), ValueError, "max_leapfrog"),
        (dict(chains=64, x64="yes"), TypeError, "x64"),
        (dict(chains=64, step_size=-1.0), ValueError, "step_size must be a positive"),
        (dict(chains=64, backend="pyro"), ValueError, "pass backend='jax'"),
    ],
)
def test_bad_arguments(kw, exc, match):
    prob = make_problem(seed=1)
    _, post = _declare(prob, False)
    kw = {"backend": "jax", **kw}
    with pytest.raises(exc, match=match):
        post.sample("chees", progress=False, **kw)


def test_unknown_method_lists_chees():
    prob = make_problem(seed=1)
    _, post = _declare(prob, False)
    with pytest.raises(ValueError, match="chees"):
        post.sample("chess", progress=False)


# ---------------------------------------------------------------------------- kernel contract
def test_kernel_step_contract_standard_normal():
    """The kernel driven directly through the sampler contract: ``kernel.init(w, key)`` and
    ``kernel.step(key, state)`` → ``(ChEESState, ChEESInfo)``, the state carrying the
    iteration counter. 64 chains on N(0, I₄) started off target, 200 adapting then 200
    sampling steps: the means of ``w`` and ``w²`` agree with 0 and 1 within 4 Monte Carlo
    standard errors (ArviZ's ESS). The step is a pure function of ``(key, state)``, and
    ``chees_sample`` with the same seed gives the same draws."""
    import jax
    import jax.numpy as jnp

    from condpost.infer.chees import (
        ChEESInfo,
        ChEESState,
        chees_sample,
        iteration_key,
        make_kernel,
        make_params,
    )

    C, d, warmup, draws = 64, 4, 200, 200
    with jax.enable_x64(True):
        fn = lambda w: (0.5 * jnp.sum(w * w), jnp.sum(w * w))  # noqa: E731
        kernel = make_kernel(fn, make_params(warmup, dtype=jnp.float64))
        key = jax.random.PRNGKey(0)
        k_run, k_init = jax.random.split(key)
        w0 = jnp.full((C, d), 2.0)
        state = kernel.init(w0, k_init)
        assert isinstance(state, ChEESState) and int(state.i) == 0
        step = jax.jit(kernel.step)
        # a pure function of (key, state): the same key repeats, another key does not
        a, ia = step(k_run, state)
        b, _ = step(k_run, state)
        c, _ = step(jax.random.PRNGKey(1), state)
        assert isinstance(ia, ChEESInfo) and ia.virial is None
        np.testing.assert_array_equal(a.w, b.w)
        assert not np.array_equal(a.w, c.w) and int(a.i) == 1
        with pytest.raises(ValueError, match="batch must be None"):
            kernel.step(k_run, state, batch=(1, 2))
        kept = []
        for t in range(warmup + draws):
            state, info = step(iteration_key(k_run, t), state)
            if t >= warmup:
                kept.append(np.asarray(info.w))
        assert int(state.i) == warmup + draws
        x = np.stack(kept, 1)  # [C, draws, d]
        res = chees_sample(fn, w0, key, warmup=warmup, draws=draws, block_size=75, progress=False)
    np.testing.assert_allclose(np.swapaxes(res["draws"]["w"], 0, 1), x, rtol=0, atol=1e-9)
    assert info.diverging.sum() == 0 and 0.3 < float(info.harmonic_accept) <= 1
    for f, truth in ((x, 0.0), (x**2, 1.0)):
        se = f.reshape(-1, d).std(0) / np.sqrt(_ess(f))
        assert np.all(np.abs(f.mean((0, 1)) - truth) < 4 * se), (f.mean((0, 1)), se)


# ---------------------------------------------------------------------------- nested R-hat
def test_nested_rhat_hand_computed():
    """K = 2 superchains of M = 2 chains with N = 2 draws, worked by hand from
    Margossian et al. (2024): chain means 1, 3 | 6, 10; within-chain variances 2;
    superchain means 2 | 8 → B̂ν = 18; Ŵν = mean(2 + 2, 8 + 2) = 7; nR̂ = √(1 + 18/7)."""
    x = np.array([[0.0, 2.0], [2.0, 4.0], [5.0, 7.0], [9.0, 11.0]])
    assert nested_rhat(x, 2) == pytest.approx(np.sqrt(25 / 7), rel=1e-14)
    # vector quantities: the same per coordinate
    two = np.stack([x, 3 * x + 1], -1)
    np.testing.assert_allclose(nested_rhat(two, 2), [np.sqrt(25 / 7)] * 2, rtol=1e-14)


def test_nested_rhat_one_chain_per_superchain_matches_arviz():
    """With M = 1, nR̂² = R̂² + 1/N for ArviZ's classic (non-split, identity) R̂: the
    paper's footnote on the two differing by the (N − 1)/N factor."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 40)) + rng.normal(size=(6, 1)) * 0.3
    r_az = float(az.rhat(x, method="identity"))
    assert nested_rhat(x, 6) ** 2 == pytest.approx(r_az**2 + 1 / 40, rel=1e-12)


def test_nested_rhat_bad_input():
    with pytest.raises(ValueError, match="superchains must be an integer ≥ 2 that divides"):
        nested_rhat(np.zeros((6, 5)), 4)
    with pytest.raises(ValueError, match="chains, draws"):
        nested_rhat(np.zeros(5), 2)
    assert np.isnan(nested_rhat(np.ones((4, 3)), 2))  # constant draws: undefined


# ---------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize(
    "constrained,perturb",
    [
        pytest.param(False, 0.0, id="ols-unconstrained"),
        pytest.param(True, 0.0, id="ols-constrained"),
        pytest.param(False, 0.05, id="perturbed-unconstrained"),
    ],
)
def test_chees_matches_exact_posterior_other_cases(constrained, perturb):
    prob = make_problem(seed=1, perturb=perturb)
    _, post = _declare(prob, constrained)
    ref = post.sample("chees", draws=100, seed=7, **RUN)
    check_exact_posterior(prob, ref, check_stderr=False)


@pytest.mark.slow
def test_chees_high_ess_matches_theory_reference_accuracy():
    """docs/theory.md §4.1's reference accuracy at ESS ≳ 10⁴, in float32 (x64=False) with
    overdispersed superchain starts: covariance within 2.5%, means within 0.02 SD."""
    prob = make_problem(seed=3)
    _, post = _declare(prob, True)
    ref = post.sample(
        "chees",
        backend="jax",
        chains=128,
        warmup=400,
        draws=200,
        seed=9,
        x64=False,
        init_jitter=0.05,
        progress=False,
    )
    assert ref.settings["x64"] is False
    mu, Sigma = prob.posterior()
    flat = ref.flat().reshape(-1, prob.d)
    ess = _ess(ref.flat())
    assert ess.min() >= 10000
    sd = np.sqrt(np.diag(Sigma))
    assert np.all(np.abs(flat.mean(0) - mu) <= np.maximum(4 * sd / np.sqrt(ess), 0.02 * sd))
    rel = np.linalg.norm(np.cov(flat.T) - Sigma) / np.linalg.norm(Sigma)
    assert rel <= 0.025, rel
    assert ref.settings["nested_rhat"]["L_n"] < 1.01


@pytest.mark.slow
def test_block_size_does_not_change_draws(case):
    prob, _, post, ref, _ = case
    other = post.sample("chees", draws=DRAWS, seed=3, **{**RUN, "block_size": 37})
    np.testing.assert_allclose(other.flat(), ref.flat(), rtol=0, atol=1e-12)


@pytest.mark.slow
def test_chains_sharded_over_two_devices():
    """With two (forced host) JAX devices the chain axis is sharded over both. Without
    adaptation each chain's dynamics is its own, so the draws equal the one-device run;
    with adaptation the across-chain means are summed in another order, which moves the
    adapted step size only at float-rounding level (the draws then drift apart slowly)."""
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        jax.config.update("jax_enable_x64", True)
        from condpost.infer.chees import chees_sample
        assert len(jax.devices()) == 2
        P = jnp.diag(jnp.array([1.0, 4.0, 100.0]))
        fn = lambda w: (0.5 * w @ P @ w, w[0])
        w0 = jnp.zeros((8, 3))
        kw = dict(warmup=60, draws=20, progress=False, keep=("w",))
        fixed = dict(step_size=0.1, trajectory_length=1.0, adapt_step_size=False,
                     adapt_trajectory=False, adapt_mass_matrix=False)
        runs = {}
        for n in (1, 2):
            for name, extra in (("fixed", fixed), ("adapted", {})):
                runs[name, n] = chees_sample(
                    fn, w0, jax.random.PRNGKey(0), devices=n, **kw, **extra
                )
        assert len(runs["fixed", 1]["devices"]) == 1
        assert len(runs["fixed", 2]["devices"]) == 2
        d = np.abs(runs["fixed", 1]["draws"]["w"] - runs["fixed", 2]["draws"]["w"]).max()
        assert d < 1e-12, d
        e1 = runs["adapted", 1]["adapted"]["step_size"]
        e2 = runs["adapted", 2]["adapted"]["step_size"]
        assert abs(e1 / e2 - 1) < 1e-6, (e1, e2)
        print("OK", d, e1, e2)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
