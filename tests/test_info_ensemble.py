"""Ensemble information targets (docs/theory.md §3.4.5) against closed forms (docs/theory.md §4.4).

Ground truth is computed here from scratch (SciPy quadrature, NumPy), never with condpost:

* end to end: NUTS on docs/theory.md §4.1's linear-Gaussian posterior N(μ, Σ), two probes,
  ``B | x_j ~ N(x_jᵀμ, x_jᵀΣx_j)``, exact ``I(X;B)`` of the two-component mixture by
  1-D quadrature (docs/theory.md §4.4 ii);
* product channel ``B = W X`` (docs/theory.md §4.4 iii) for ``target="channel"``: ``h(B)`` by
  nested quadrature, ``h(B|X) = ½log(2πe s²) − ½(γ_E + log 2)``;
* common cause ``A = W + X₁``, ``B = W + X₂`` (docs/theory.md §3.4.4): jointly Gaussian, so the
  observational MI is ``−½log(1 − ρ²)`` with ``ρ = s²/(s² + 1)``, and the channel MI is 0.

Tolerances: 4 bootstrap standard errors (the library's two-way half-sampling
bootstrap), or 0.03 nats where the estimator's own bias dominates (said at each test).
Exact posterior draws (``ReferenceClass.from_draws`` on iid Gaussian draws from the
closed-form posterior) isolate the MI machinery from MCMC error, except in the
end-to-end test, which samples with NUTS.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem
from scipy import integrate, special

import condpost as cp
from condpost import info
from condpost.info import ensemble
from condpost.reference import ReferenceClass

# ------------------------------------------------------------------------- ground truth


def mixture_mi_1d(means, variances) -> float:
    """I(J;B), J uniform on the components, B | J=j ~ N(means[j], variances[j]); quadrature."""
    means, sds = np.asarray(means, float), np.sqrt(np.asarray(variances, float))
    m = len(means)

    def logpdf(b, j):
        return -0.5 * ((b - means[j]) / sds[j]) ** 2 - math.log(sds[j] * math.sqrt(2 * math.pi))

    total = 0.0
    for j in range(m):

        def f(b, j=j):
            lj = logpdf(b, j)
            lmix = special.logsumexp([logpdf(b, k) for k in range(m)]) - math.log(m)
            return math.exp(lj) * (lj - lmix)

        lo, hi = means[j] - 12 * sds[j], means[j] + 12 * sds[j]
        total += integrate.quad(f, lo, hi, limit=200, epsabs=1e-12)[0] / m
    return total


def product_channel_h_b(mu: float, s: float) -> float:
    """h(B) for B = W X, X ~ N(0,1), W ~ N(μ, s²), by nested quadrature."""
    if mu == 0:

        def p_b(b):  # docs/theory.md §4.4 iii: p_B(b) = K₀(|b|/s)/(πs)
            return special.k0(abs(b) / s) / (math.pi * s)
    else:

        def p_b(b):
            def f(w):
                return math.exp(-0.5 * ((w - mu) / s) ** 2 - 0.5 * (b / w) ** 2) / (
                    2 * math.pi * s * abs(w)
                )

            lo, hi = mu - 12 * s, mu + 12 * s
            pts = [0.0] if lo < 0 < hi else None
            return integrate.quad(f, lo, hi, points=pts, limit=400, epsabs=1e-13)[0]

    def g(b):
        p = p_b(b)
        return -p * math.log(p) if p > 0 else 0.0

    scale = math.sqrt(mu**2 + s**2)
    return sum(
        integrate.quad(g, a, c, limit=400, epsabs=1e-10)[0]
        for a, c in ((-40 * scale, 0.0), (0.0, 40 * scale))
    )


def product_channel_mi(mu: float, s: float) -> float:
    """I(X; WX) = h(B) − h(B|X), h(B|X) = ½log(2πe s²) + ½E[log X²], E[log X²] = −γ_E − log 2."""
    h_bx = 0.5 * math.log(2 * math.pi * math.e * s * s) - 0.5 * (np.euler_gamma + math.log(2))
    return product_channel_h_b(mu, s) - h_bx


def test_ground_truth_matches_theory_tables():
    # docs/theory.md §4.4 iii (quadrature 0.42034; MC 1.868 ± 0.008) and §4.4 ii (0.1114, 0.3368)
    assert abs(product_channel_mi(0.0, 1.0) - 0.42034) < 1e-4
    assert abs(product_channel_mi(1.0, 0.3) - 1.868) < 3 * 0.008
    assert abs(mixture_mi_1d([-1, 1], [4, 4]) - 0.1114) < 1e-3
    assert abs(mixture_mi_1d([-1, 1], [1, 1]) - 0.3368) < 1e-3


# ------------------------------------------------------------------------- fixtures


def _declare_linear(prob):
    return cp.LocalPosterior(
        linear_net(prob),
        data=(prob.X, prob.Y),
        likelihood=cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )


def _exact_ref(post, mu, Sigma, S, seed=0):
    """A ReferenceClass of iid draws from the exact posterior N(μ, Σ) (2 chains)."""
    rng = np.random.default_rng(seed)
    W = rng.multivariate_normal(np.atleast_1d(mu), np.atleast_2d(Sigma), size=(2, S // 2))
    return ReferenceClass.from_draws(post, torch.as_tensor(W), settings={"method": "exact"})


def _product_ref(mu, s, S, seed=0):
    """Two scalar layers: site "0" = X (frozen identity), site "1" = W X, W ~ N(μ, s²).

    The data ``y = μx`` (noise-free, so w* = μ is the least-squares minimiser) with unit
    Gaussian noise scale give the exact posterior N(μ, 1/(nβ·mean(x²) + γ)); nβ and γ are
    chosen so that this is N(μ, s²).
    """
    net = torch.nn.Sequential(
        torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    ).double()
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].weight.fill_(mu)
    g = torch.Generator().manual_seed(100)
    x = torch.randn(200, 1, generator=g, dtype=torch.float64)
    gamma = 0.5 / s**2
    nbeta = (1 / s**2 - gamma) / float((x**2).mean())
    post = cp.LocalPosterior(
        net,
        (x, mu * x),
        cp.Gaussian(scale=1.0),
        nbeta=nbeta,
        localization=gamma,
        include="1.weight",
        check_center=False,
    )
    # the closed-form posterior variance really is s²
    var = 1.0 / (post.nbeta * float((x**2).mean()) + post.localization)
    assert abs(var - s**2) < 1e-12
    return _exact_ref(post, [mu], [[s**2]], S, seed)


def _probes(m, dim, seed):
    return torch.randn(m, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------- end to end


def test_end_to_end_nuts_input_target_matches_exact_mixture():
    """docs/theory.md §4.4 ii acceptance: NUTS on §4.1's posterior, two probes, I(X;B) vs exact.

    Tolerance: 4 bootstrap SE (the Ross estimator is unbiased to < 0.01 nats at this N on
    1-D Gaussian mixtures, checked against the table of docs/theory.md, so sampling error dominates).
    """
    prob = make_problem(seed=2, din=2, k=1)
    post = _declare_linear(prob)
    mu, Sigma = prob.posterior()
    # two probes whose outputs overlap under the posterior: x2 = x1 + δ·v along the
    # posterior's principal axis, δ set so that the mean gap is 1.2 posterior sd's
    x1 = np.array([0.7, -0.4])
    v = np.linalg.eigh(Sigma)[1][:, -1]
    sd1 = math.sqrt(x1 @ Sigma @ x1)
    delta = 1.2 * sd1 / abs(v @ mu)
    x2 = x1 + delta * v
    probes = torch.as_tensor(np.stack([x1, x2]))
    exact = mixture_mi_1d([x1 @ mu, x2 @ mu], [x1 @ Sigma @ x1, x2 @ Sigma @ x2])
    assert 0.1 < exact < 0.5  # a non-trivial value, far from 0 and from log 2
    ref = post.sample("nuts", chains=2, warmup=100, draws=1000, seed=7, progress=False)
    res = info.mutual_information(ref, probes=probes, b="", target="input", bootstrap=60)
    assert res.estimator == "ross"
    assert res.settings["pairs"] == 2000 and res.settings["num_probes"] == 2
    assert res.settings["nbeta"] == pytest.approx(prob.nbeta)
    assert res.settings["bound"] == pytest.approx(math.log(2))
    assert 0.005 < res.stderr < 0.05
    assert abs(res.value - exact) <= 4 * res.stderr, (res.value, exact, res.stderr)
    # the Gaussian-fit estimator is exact in law here (linear readout, Gaussian posterior)
    gm = info.mutual_information(
        ref, probes=probes, b="", target="input", estimator="gaussian_mixture", bootstrap=40
    )
    assert gm.estimator == "gaussian_mixture"
    assert abs(gm.value - exact) <= 4 * gm.stderr, (gm.value, exact, gm.stderr)


def mixture_mi_mc(means, covs, n=400_000, seed=0) -> tuple[float, float]:
    """I(J;B) for uniform J and B | J=j ~ N(means[j], covs[j]) by MC with exact densities."""
    rng = np.random.default_rng(seed)
    m, d = means.shape
    chol = [np.linalg.cholesky(c) for c in covs]

    def logpdf(b, j):
        z = np.linalg.solve(chol[j], (b - means[j]).T)
        logdet = 2 * np.log(np.diag(chol[j])).sum()
        return -0.5 * (z * z).sum(0) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)

    terms = []
    for j in range(m):
        b = means[j] + rng.standard_normal((n, d)) @ chol[j].T
        lp = np.stack([logpdf(b, k) for k in range(m)])
        terms.append(lp[j] - (special.logsumexp(lp, axis=0) - math.log(m)))
    t = np.concatenate(terms)
    return float(t.mean()), float(t.std() / math.sqrt(t.size))


@pytest.mark.slow
def test_end_to_end_reference_run_two_dimensional_output():
    """docs/theory.md §4.1 reference run (d_in = 3, k = 2, d = 6), B = W x ∈ R², two probes; NUTS.

    Exact I(X;B) by Monte Carlo with exact densities (SE ~1e-3); tolerance 4 bootstrap SE.
    """
    prob = make_problem(seed=1)
    post = _declare_linear(prob)
    mu, Sigma = prob.posterior()
    g = np.random.default_rng(5)
    x1 = g.standard_normal(3)
    x2 = x1 + 0.1 * g.standard_normal(3)
    probes = torch.as_tensor(np.stack([x1, x2]))
    M = [np.kron(np.eye(2), x[None]) for x in (x1, x2)]
    means = np.stack([Mj @ mu for Mj in M])
    covs = np.stack([Mj @ Sigma @ Mj.T for Mj in M])
    exact, exact_se = mixture_mi_mc(means, covs)
    assert 0.1 < exact < 0.6 and exact_se < 2e-3
    ref = post.sample("nuts", chains=4, warmup=300, draws=1500, seed=11, progress=False)
    for est in ("ross", "gaussian_mixture"):
        res = info.mutual_information(
            ref, probes=probes, b="", target="input", estimator=est, bootstrap=100
        )
        assert abs(res.value - exact) <= 4 * res.stderr + 2 * exact_se, (est, res.value, exact)


# ------------------------------------------------------------------------- channel target


@pytest.mark.parametrize("mu,s", [(0.0, 1.0), (1.0, 0.3)])
def test_channel_product_channel(mu, s):
    """docs/theory.md §4.4 iii: I(A'; W A') with A' ~ N(0,1) independent of W ~ N(μ, s²).

    KSG (k = 10) at N = 4000 pairs; tolerance max(4 SE, 0.03): on this heavy-tailed law
    KSG's bias is of order 0.02 nats (docs/theory.md §3.4.7 quotes 0.398 vs 0.420 at N = 5000).
    """
    exact = product_channel_mi(mu, s)
    ref = _product_ref(mu, s, 8000)
    res = info.mutual_information(
        ref,
        probes=_probes(8000, 1, 3),
        a="0",
        b="1",
        target="channel",
        estimator="ksg",
        bootstrap=40,
        progress=False,
    )
    # site "0" is upstream of every lifted weight, so A' = A(x) for every member and one
    # draw per pair suffices (with a weight-dependent A', each pair needs two draws)
    assert res.n == 8000
    assert res.settings["sides"]["A'"]["values"] == 8000  # a function of the probe
    assert res.settings["resample"] == ["draws", "probes"]
    assert abs(res.value - exact) <= max(4 * res.stderr, 0.03), (res.value, exact, res.stderr)


def _common_cause_post(var):
    """A = W + X₁ and B = W + X₂ share one lifted bias W; neither site feeds the other."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
            self.site_a = torch.nn.Identity()
            self.site_b = torch.nn.Identity()

        def forward(self, x):
            a = self.site_a(x[:, :1] + self.w)
            b = self.site_b(x[:, 1:] + self.w)
            return torch.cat([a, b], -1)

    x = _probes(100, 2, 5)
    # L_n = mean_i ‖y_i − x_i − w‖²/2 with y = x: posterior N(0, 1/(2nβ + γ)) = N(0, var)
    gamma = 0.5 / var
    post = cp.LocalPosterior(
        Net(),
        (x, x.clone()),
        cp.Gaussian(scale=1.0),
        nbeta=(1 / var - gamma) / 2,
        localization=gamma,
        check_center=False,
    )
    return post


def test_common_cause_observational_vs_channel():
    """docs/theory.md §3.4.4: shared weights alone create dependence; the channel target removes it.

    Observational: jointly Gaussian, I = −½log(1 − ρ²), ρ = var/(var + 1). Channel: B
    does not depend on A at all, so I = 0. KSG (k = 10), tolerance max(4 SE, 0.03).
    """
    var = 1.5
    post = _common_cause_post(var)
    ref = _exact_ref(post, [0.0], [[var]], 6000)
    rho = var / (var + 1)
    exact = -0.5 * math.log(1 - rho**2)
    probes = _probes(6000, 2, 9)
    kw = dict(probes=probes, a="site_a", b="site_b", estimator="ksg", bootstrap=40)
    obs = info.mutual_information(ref, target="observational", **kw)
    assert abs(obs.value - exact) <= max(4 * obs.stderr, 0.03), (obs.value, exact, obs.stderr)
    ch = info.mutual_information(ref, target="channel", **kw)
    assert abs(ch.value) <= max(4 * ch.stderr, 0.03), (ch.value, ch.stderr)
    assert any("no path from a to b" in n for n in ch.notes)
    # site_b runs after site_a: swapped, a does not feed b, which is an error naming both
    with pytest.raises(ValueError, match="a='site_b' to feed site b='site_a'.*Swap them"):
        info.mutual_information(ref, target="channel", **{**kw, "a": "site_b", "b": "site_a"})
    assert obs.value - ch.value > 0.2


# ------------------------------------------------------------------------- input bound


def test_input_target_saturates_at_log_m():
    """Probes far apart relative to the posterior spread: I(X;B) = log m − ε (m = 3)."""
    prob = make_problem(seed=2, din=2, k=1)
    post = _declare_linear(prob)
    mu, Sigma = prob.posterior()
    probes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    P = probes.numpy()
    exact = mixture_mi_1d(P @ mu, np.einsum("ij,jk,ik->i", P, Sigma, P))
    assert math.log(3) - exact < 1e-3  # the probes are (nearly) perfectly separable
    ref = _exact_ref(post, mu, Sigma, 3000)
    res = info.mutual_information(ref, probes=probes, b="", target="input", bootstrap=40)
    assert res.settings["bound"] == pytest.approx(math.log(3))
    # the Ross estimator never exceeds ψ(N) − ψ(N/m) ≈ log m: bias dominates at the bound
    assert abs(res.value - exact) <= max(4 * res.stderr, 0.03)
    assert res.value <= math.log(3) + 4 * res.stderr + 1e-3
    assert any("at the bound" in n for n in res.notes)


def test_input_bound_violation_is_flagged(monkeypatch):
    """An estimate above log m beyond its error must warn and be noted (docs/theory.md §5.5)."""
    prob = make_problem(seed=2, din=2, k=1)
    post = _declare_linear(prob)
    mu, Sigma = prob.posterior()
    ref = _exact_ref(post, mu, Sigma, 400)
    # a deliberately broken estimator returning log 2 + 0.3 with no spread
    monkeypatch.setattr(
        ensemble, "_labelled_mi", lambda *a, **k: (math.log(2) + 0.3, "ross", {"k": 3})
    )
    with pytest.warns(info.InfoWarning, match="exceeds the bound log m"):
        res = info.mutual_information(ref, probes=_probes(2, 2, 1), b="", target="input")
    assert any("exceeds the bound" in n for n in res.notes)
    # never an impossible number: the value is the bound, labelled as one
    assert res.bound and res.value == pytest.approx(math.log(2))
    assert res.upper_bound == pytest.approx(math.log(2))
    assert res.details["raw_value"] == pytest.approx(math.log(2) + 0.3)
    with pytest.raises(ValueError, match="exceeds the bound log m.*on_bound='raise'"):
        info.mutual_information(
            ref, probes=_probes(2, 2, 1), b="", target="input", on_bound="raise"
        )


# ------------------------------------------------------------------------- bootstrap SE


def test_bootstrap_stderr_shrinks_like_inverse_sqrt_n():
    """Quadrupling the pairs halves the half-sampling SE (ratio 2 ± 40%: the SE of an SE
    from 60 replicates is ~9%, and the kNN variance is only asymptotically ∝ 1/N)."""
    ref = _product_ref(0.0, 1.0, 4000, seed=1)
    probes = _probes(4000, 1, 4)
    kw = dict(probes=probes, a="0", b="1", target="channel", source="center", estimator="ksg")
    small = info.mutual_information(ref, pairs=1000, bootstrap=60, seed=1, **kw)
    large = info.mutual_information(ref, pairs=4000, bootstrap=60, seed=1, **kw)
    assert small.n == 1000 and large.n == 4000
    ratio = small.stderr / large.stderr
    assert 1.2 < ratio < 2.8, ratio


@pytest.mark.slow
def test_bootstrap_stderr_matches_sampling_spread():
    """The bootstrap SE matches the SD of estimates over 24 independent reference classes
    (ratio within [0.6, 1.5]; the SD from 24 replicates has ~15% relative error)."""
    vals, ses = [], []
    for r in range(24):
        ref = _product_ref(0.0, 1.0, 1000, seed=100 + r)
        res = info.mutual_information(
            ref,
            probes=_probes(1000, 1, 2000 + r),
            a="0",
            b="1",
            target="channel",
            source="center",
            estimator="ksg",
            bootstrap=100,
            seed=r,
        )
        vals.append(res.value)
        ses.append(res.stderr)
    ratio = np.mean(ses) / np.std(vals, ddof=1)
    assert 0.6 < ratio < 1.5, ratio


# ------------------------------------------------------------------------- entropy


def test_entropy_observational_single_probe_is_gaussian():
    """One probe: A = xᵀW ~ N(xᵀμ, xᵀΣx) exactly, h = ½log(2πe xᵀΣx). KL estimator (k = 5)
    on 3000 draws; tolerance max(4 SE, 0.03)."""
    prob = make_problem(seed=2, din=2, k=1)
    post = _declare_linear(prob)
    mu, Sigma = prob.posterior()
    ref = _exact_ref(post, mu, Sigma, 3000)
    x = np.array([[0.3, 1.1]])
    exact = 0.5 * math.log(2 * math.pi * math.e * float(x[0] @ Sigma @ x[0]))
    res = info.entropy(ref, probes=torch.as_tensor(x), a="", bootstrap=40)
    assert res.settings["quantity"] == "entropy"
    assert abs(res.value - exact) <= max(4 * res.stderr, 0.03), (res.value, exact, res.stderr)


def test_entropy_channel_product_channel():
    """h(C_W(A')) = h(WX) for the product channel, by quadrature; tolerance max(4 SE, 0.03)."""
    mu, s = 1.0, 0.3
    ref = _product_ref(mu, s, 6000, seed=2)
    res = info.entropy(
        ref, probes=_probes(6000, 1, 8), a="0", b="1", target="channel", bootstrap=40
    )
    exact = product_channel_h_b(mu, s)
    assert abs(res.value - exact) <= max(4 * res.stderr, 0.03), (res.value, exact, res.stderr)


# ------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_ref():
    prob = make_problem(seed=2, din=2, k=1)
    post = _declare_linear(prob)
    mu, Sigma = prob.posterior()
    return _exact_ref(post, mu, Sigma, 200)


def test_unknown_site_names_nearest(small_ref):
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    net = net.double()
    x = _probes(50, 2, 0)
    post = cp.LocalPosterior(
        net, (x, x[:, :1]), cp.Gaussian(scale=1.0), localization=1.0, check_center=False
    )
    ref = _exact_ref(post, post.center.numpy(), 0.01 * np.eye(post.d), 200)
    with pytest.raises(ValueError, match=r"a: '3' is not a module path.*Nearest sites"):
        info.mutual_information(ref, probes=x, a="3", b="2")
    with pytest.raises(ValueError, match=r"b: 'layer2'.*Nearest sites"):
        info.mutual_information(ref, probes=x, a="0", b="layer2")


def test_bad_arguments(small_ref):
    p2 = _probes(2, 2, 0)
    with pytest.raises(
        ValueError, match="target='obs' is not one of.*did you mean 'observational'"
    ):
        info.mutual_information(small_ref, probes=p2, a="", b="", target="obs")
    with pytest.raises(ValueError, match="leave a=None"):
        info.mutual_information(small_ref, probes=p2, a="", b="", target="input")
    with pytest.raises(ValueError, match="needs the site a"):
        info.mutual_information(small_ref, probes=p2, b="", target="channel")
    with pytest.raises(ValueError, match="would reuse weight draws"):
        info.mutual_information(small_ref, probes=p2, b="", target="input", pairs=201)
    with pytest.raises(ValueError, match="draws=500 exceeds the 200 draws"):
        info.mutual_information(small_ref, probes=p2, b="", target="input", draws=500)
    with pytest.raises(ValueError, match="bootstrap must be an integer"):
        info.mutual_information(small_ref, probes=p2, b="", target="input", bootstrap=-1)
    with pytest.raises(ValueError, match="only 2 probes"):
        info.mutual_information(small_ref, probes=p2, b="", target="input", resample="probes")
    with pytest.raises(ValueError, match="needs at least 2 probes"):
        info.mutual_information(small_ref, probes=p2[:1], b="", target="input")
    with pytest.raises(ValueError, match="probes has shape"):
        info.mutual_information(small_ref, probes=_probes(4, 3, 0), b="", target="input")
    with pytest.raises(ValueError, match="finitely many values.*'ross'"):
        info.mutual_information(small_ref, probes=p2, b="", target="input", estimator="ksg")
    with pytest.raises(ValueError, match="target='input' is not one of"):
        info.entropy(small_ref, probes=p2, a="", target="input")
    with pytest.raises(TypeError, match="ReferenceClass"):
        ensemble.mutual_information(np.zeros(3), probes=p2, b="", target="input")


def test_loaded_reference_needs_posterior(small_ref, tmp_path):
    path = small_ref.save(tmp_path / "ref.npz")
    loaded = ReferenceClass.load(path)
    with pytest.raises(RuntimeError, match="needs the network"):
        info.mutual_information(loaded, probes=_probes(2, 2, 0), b="", target="input")
