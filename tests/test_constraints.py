"""The constraint catalogue: gradients vs finite differences, exact binding ratios,
CircuitMap ≡ Activations, sensitivities vs closed-form derivatives, calibration, bad input."""

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem

import condpost as cp


def _mlp(act=torch.nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 6), act(), torch.nn.Linear(6, 5), act(), torch.nn.Linear(5, 4)
    ).double()


def _data(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 4, (n,), generator=g
    )


def _catalogue(x):
    p = x[:7]
    return [
        cp.Activations("1", p, tolerance=0.1),
        cp.Activations("3", p, tolerance=0.1, measure="cka"),
        cp.Activations("3", p, tolerance=0.1, side="upper", margin=0.01, name="act-upper"),
        cp.CircuitMap("1", "3", p, interventions="resample", tolerance=0.1),
        cp.CircuitMap("1", "4", p, interventions="mean", tolerance=0.1),
        cp.Outputs(p, kl=1.0),
        cp.Outputs(p, tolerance=0.2),
        cp.ActivationSparsity("1", p, surrogate="sigmoid", tolerance=0.05),
        cp.ActivationSparsity("3", p, surrogate="l1", tolerance=0.05, side="upper"),
        cp.ActivationSparsity("1", p, surrogate="hoyer", strength=0.5, name="hoyer"),
        cp.FiringPattern("1", p, tolerance=0.3),
        cp.FiringPattern("3", p, tolerance=0.3, side="upper"),
        cp.WeightSparsity("2.weight", form="smoothed_l1", tolerance=0.1),
        cp.WeightSparsity("0.*", form="smoothed_l0", eps=0.1, tolerance=0.1, side="upper"),
        cp.WeightSparsity("4.weight", form="zero_pattern", threshold=0.2, tolerance=0.05),
        cp.LowRank("2.weight", rank=2, form="tail_energy", tolerance=0.1),
        cp.LowRank("0.weight", form="nuclear", tolerance=0.1),
        cp.LowRank("4.weight", form="effective_rank", tolerance=0.1, side="upper"),
        cp.Quantized("4.*", step=0.25, tolerance=0.05),
        cp.LossLevel(0.01, tolerance=0.05),
        cp.Feature(lambda v: v.activation(x[:7], "3").norm(dim=-1), tolerance=0.1, name="norms"),
    ]


def _post(x, y, constraints=(), **kw):
    post = cp.LocalPosterior(
        _mlp(), (x, y), cp.Categorical(), nbeta=20.0, localization=2.0, check_center=False, **kw
    )
    for c in constraints:
        post.preserve(c)
    return post


def test_every_surrogate_gradient_matches_finite_differences():
    x, y = _data()
    post = _post(x, y, _catalogue(x))
    g = torch.Generator().manual_seed(3)
    points = [post.center.clone()] + [
        post.center + 0.2 * torch.randn(post.d, generator=g, dtype=torch.float64) for _ in range(2)
    ]
    for b in post.constraints:
        for i, w in enumerate(points):
            w = w.clone().requires_grad_(True)

            def f(v, b=b):
                return b.defect(post.view(v))

            assert torch.isfinite(f(w)), b.name
            if i == 0 and b.family == "hinge":
                # w* sits exactly on the hinge's kink: D = max(0, g − g*)² is C¹ with zero
                # gradient there, and central differences carry an O(h·‖∇g‖²) error
                (an,) = torch.autograd.grad(f(w), w)
                assert torch.equal(an, torch.zeros_like(an)), b.name
                h = 1e-7
                with torch.no_grad():
                    e = torch.eye(post.d, dtype=torch.float64) * h
                    num = torch.stack(
                        [(f(w + e[j]) - f(w - e[j])) / (2 * h) for j in range(post.d)]
                    )
                assert num.abs().max() < 1e-4, b.name
                continue
            assert torch.autograd.gradcheck(f, (w,), eps=1e-6, atol=1e-8, rtol=1e-4), b.name
    # and the whole potential
    w = points[1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(post.potential, (w,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_defects_vanish_or_are_minimal_at_center_and_no_nan():
    x, y = _data()
    post = _post(x, y, _catalogue(x))
    for b in post.constraints:
        d = float(b.defect(post.view(post.center)))
        if b.family in ("gaussian", "hinge", "cka", "kl"):
            assert abs(d) < 1e-12, (b.name, d)
    # features that are exactly zero at w*: dead ReLU units, an all-zero matrix
    net = _mlp(torch.nn.ReLU)
    with torch.no_grad():
        net[0].bias.fill_(-100.0)  # every first-layer unit is dead: activations are exactly 0
        net[2].weight.zero_()
    post = cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=1e-4, check_center=False)
    zero_cons = [
        cp.ActivationSparsity("1", x[:5], surrogate="hoyer", tolerance=0.1),
        cp.ActivationSparsity("1", x[:5], surrogate="sigmoid", tau=0.1, tolerance=0.1, name="sig"),
        cp.LowRank("2.weight", rank=1, form="tail_energy", tolerance=0.1),
        cp.LowRank("2.weight", form="nuclear", tolerance=0.1, name="nuc"),
        cp.LowRank("2.weight", form="effective_rank", tolerance=0.1, name="eff"),
        cp.WeightSparsity("2.weight", form="smoothed_l0", tolerance=0.1),
    ]
    for c in zero_cons:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", cp.ConstraintWarning)  # dead units: flat feature
            post.preserve(c)
    w = post.center.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(post.potential(w), w)
    assert torch.isfinite(gr).all()


@pytest.mark.parametrize("sv", [[1.0, 1.0, 1.0, 0.5, 0.0], [2.0, 1.0, 1.0, 0.0, 0.0], [0.0] * 5])
@pytest.mark.parametrize(
    "form,rank", [("tail_energy", 1), ("tail_energy", 2), ("nuclear", 1), ("effective_rank", 1)]
)
def test_low_rank_gradients_finite_at_repeated_and_zero_singular_values(sv, form, rank):
    net = _mlp()
    q1, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    with torch.no_grad():
        net[2].weight.copy_(q1 @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ q2[:5])
    x, y = _data()
    post = cp.LocalPosterior(
        net, (x, y), cp.Categorical(), localization=1.0, include="2.weight", check_center=False
    )
    post.preserve(cp.LowRank("2.weight", rank=rank, form=form, tolerance=0.1))
    b = post.constraints[0]
    for w in [post.center, post.center + 1e-3 * torch.randn(post.d, dtype=torch.float64)]:
        w = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(b.feature(post.view(w)), w)
        assert torch.isfinite(g).all()
    # the exact feature: tail energy = Σ_{i>r} σ_i²
    if form == "tail_energy":
        expect = sum(s * s for s in sorted(sv, reverse=True)[rank:])
        assert float(b.target) == pytest.approx(expect, abs=1e-12)


def test_circuit_map_with_upstream_frozen_equals_activations():
    """CircuitMap(clean) with everything upstream of the source frozen has the same
    potential (hence the same posterior) as Activations at the target."""
    x, y = _data()
    probes = x[:6]
    kw = dict(include=["2.*", "4.*"])
    p1 = _post(x, y, [cp.CircuitMap("1", "3", probes, interventions="clean", tolerance=0.07)], **kw)
    p2 = _post(x, y, [cp.Activations("3", probes, tolerance=0.07)], **kw)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        w = p1.center + 0.3 * torch.randn(p1.d, generator=g, dtype=torch.float64)
        assert torch.allclose(p1.potential(w), p2.potential(w), rtol=1e-12)
    # with upstream lifted, the circuit map ignores upstream changes; activations do not
    p3 = _post(x, y, [cp.CircuitMap("1", "3", probes, interventions="clean", tolerance=0.07)])
    w = p3.center.clone()
    w[: 3 * 6] += 0.5  # first-layer weights only
    b = p3.constraints[0]
    assert float(b.defect(p3.view(w))) == pytest.approx(0.0, abs=1e-20)


def _lg_with_activation(prob, sigma, probes):
    net = linear_net(prob)
    post = cp.LocalPosterior(
        net,
        (prob.X, prob.Y),
        cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )
    post.preserve(cp.Activations("", probes, tolerance=sigma))
    C = np.kron(np.eye(prob.k), probes.numpy())
    prob.constraints = [(C, C @ prob.w_star, sigma)]
    return post, C


@pytest.mark.parametrize(
    "target_b", [0.1, pytest.param(0.5, marks=pytest.mark.slow), 0.9]
)  # 0.5 is also reached by the calibrate tests; the full sweep runs with -m slow
def test_binding_ratio_matches_exact(target_b):
    prob = make_problem(seed=1)
    probes = torch.randn(
        2, prob.din, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    # choose σ from the exact unconstrained covariance so that b spans 0.1 … 0.9
    C = np.kron(np.eye(prob.k), probes.numpy())
    _, S0 = prob.posterior()
    from condpost.calibration import solve_tolerance

    sigma = math.sqrt(solve_tolerance(np.linalg.eigvalsh(C @ S0 @ C.T), target_b))
    post, C = _lg_with_activation(prob, sigma, probes)
    _, Sigma = prob.posterior()
    exact_b = np.trace(C @ Sigma @ C.T) / (C.shape[0] * sigma**2)
    assert exact_b == pytest.approx(target_b, rel=1e-6)  # Woodbury identity (docs/theory.md §2.2)
    ref = post.sample("nuts", chains=4, warmup=300, draws=1000, seed=2, progress=False)
    row = ref.preservation(warn_user=False).rows[0]
    b = 2 * row["rho"] * ref.defects()[row["constraint"]] / row["k"]
    se = b.std() / math.sqrt(float(az.ess(b, method="mean")))
    assert abs(row["binding"] - exact_b) <= 4 * se, (row["binding"], exact_b, se)


def test_sensitivity_matches_closed_form_derivative():
    prob = make_problem(seed=1, perturb=0.05)
    probes = torch.randn(
        2, prob.din, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    sigma = 0.1
    post, C = _lg_with_activation(prob, sigma, probes)
    k = C.shape[0]
    rho = k / (2 * sigma**2)

    def expected_loss(r):
        s = math.sqrt(k / (2 * r))
        prob.constraints = [(C, C @ prob.w_star, s)]
        return prob.expected_nbeta_dL() / prob.nbeta

    h = 1e-3 * rho
    exact = (expected_loss(rho + h) - expected_loss(rho - h)) / (2 * h)
    ref = post.sample("nuts", chains=4, warmup=300, draws=1500, seed=4, progress=False)
    name = post.constraints[0].name
    s = cp.sensitivity(ref, "loss", name)
    assert abs(s.value - exact) <= 4 * s.stderr, (s.value, exact, s.stderr)
    # the temperature knob: dE[L]/dnβ = −Var(L)
    st = cp.sensitivity(ref, "loss", "nbeta")
    assert st.value == pytest.approx(-ref.loss().var(), rel=1e-9)
    # w.r.t. the tolerance: chain rule dρ/dσ = −k/σ³
    s_tol = cp.sensitivity(ref, "loss", name, wrt="tolerance")
    assert s_tol.value == pytest.approx(s.value * (-k / sigma**3), rel=1e-12)


@pytest.mark.slow
def test_sensitivity_matches_two_run_finite_difference():
    """The issue's check: two separate runs at ρ ± h, difference of means, within MC error."""
    prob = make_problem(seed=1, perturb=0.05)
    probes = torch.randn(
        2, prob.din, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    k = 2 * prob.k
    sig = 0.1
    rho = k / (2 * sig**2)
    h = 0.3 * rho
    means, ses = [], []
    for r, seed in ((rho - h, 1), (rho + h, 2)):
        post, _ = _lg_with_activation(prob, math.sqrt(k / (2 * r)), probes)
        ref = post.sample("nuts", chains=4, warmup=300, draws=1500, seed=seed, progress=False)
        L = ref.loss()
        means.append(L.mean())
        ses.append(L.std() / math.sqrt(float(az.ess(L, method="mean"))))
    fd = (means[1] - means[0]) / (2 * h)
    fd_se = math.hypot(*ses) / (2 * h)
    post, _ = _lg_with_activation(prob, sig, probes)
    ref = post.sample("nuts", chains=4, warmup=300, draws=1500, seed=3, progress=False)
    s = cp.sensitivity(ref, "loss", post.constraints[0].name)
    # the secant over ±30% differs from the tangent by O(h²); compare within MC error
    assert abs(s.value - fd) <= 4 * math.hypot(s.stderr, fd_se), (s.value, fd, s.stderr, fd_se)


def test_calibrate_reaches_target_binding_on_linear_gaussian():
    prob = make_problem(seed=2)
    probes = torch.randn(
        3, prob.din, generator=torch.Generator().manual_seed(8), dtype=torch.float64
    )
    post, C = _lg_with_activation(prob, 1.0, probes)
    cal = cp.calibrate(post, target_binding=0.5, chains=2, warmup=300, draws=800, seed=1)
    info = cal.calibration[post.constraints[0].name]
    assert info["method"] == "eigen" and cal.constraints[0].strength is not None
    ref = cal.sample("nuts", chains=2, warmup=300, draws=1000, seed=5, progress=False)
    b = ref.preservation(warn_user=False).rows[0]["binding"]
    assert abs(b - 0.5) <= 0.1, b
    # against the exact answer: σ solving the equation with the true V_c
    _, S0 = make_problem(seed=2).posterior()
    exact_sigma = math.sqrt(
        __import__("condpost.calibration", fromlist=["x"]).solve_tolerance(
            np.linalg.eigvalsh(C @ S0 @ C.T), 0.5
        )
    )
    assert info["sigma"] == pytest.approx(exact_sigma, rel=0.15)


def test_calibrate_refine_corrects_a_misestimated_spectrum():
    """A pilot whose spread is 2× too wide (4× the covariance) misleads the spectrum rule;
    one constrained refinement run measures the binding and corrects σ to the exact one."""
    from condpost.calibration import solve_tolerance

    prob = make_problem(seed=2)
    probes = torch.randn(
        3, prob.din, generator=torch.Generator().manual_seed(8), dtype=torch.float64
    )
    post, C = _lg_with_activation(prob, 1.0, probes)
    mu0, S0 = make_problem(seed=2).posterior()  # the unconstrained exact law
    rng = np.random.default_rng(0)
    Wp = rng.multivariate_normal(mu0, 4.0 * S0, size=(2, 1500))
    pilot = cp.ReferenceClass.from_draws(
        post._replace(constraints=[]), torch.as_tensor(Wp), settings={"method": "exact"}
    )
    v = np.linalg.eigvalsh(C @ S0 @ C.T)
    exact_sigma = math.sqrt(solve_tolerance(v, 0.5))
    name = post.constraints[0].name
    plain = cp.calibrate(post, target_binding=0.5, pilot=pilot).calibration[name]
    assert plain["sigma"] > 1.6 * exact_sigma  # the bad pilot alone is far off (≈2×)
    cal = cp.calibrate(
        post, target_binding=0.5, pilot=pilot, refine=2, tol=0.05, warmup=300, draws=800, seed=1
    )
    info = cal.calibration[name]
    assert "refined" in info["method"] and len(info["history"]) >= 1
    # first measured binding: exact value at the pilot's σ (b is a mean of k=6 ratios, each
    # draw's defect is a χ²-type variable; 800×2 draws put its SE near 0.02)
    s0, b0 = info["history"][0]
    b0_exact = float(np.mean(v / (v + s0**2)))
    assert abs(b0 - b0_exact) <= 0.08, (b0, b0_exact)
    # after the correction σ is the exact one up to the MC error of the measured binding
    assert info["sigma"] == pytest.approx(exact_sigma, rel=0.15), (info, exact_sigma)


def test_calibrate_knows_the_reachable_binding_from_the_jacobian_rank():
    """Activations of 4 probes in 3 input dims: k = 8 entries but rank(J) = 6, so at most
    6/8 of the feature can be pinned; a higher target is refused and says why, a reachable
    one gives the exact σ (spectrum of the exact V_c = C Σ Cᵀ, which has rank 6)."""
    from condpost.calibration import solve_tolerance

    prob = make_problem(seed=2)
    probes = torch.randn(
        4, prob.din, generator=torch.Generator().manual_seed(9), dtype=torch.float64
    )
    post, C = _lg_with_activation(prob, 1.0, probes)
    mu0, S0 = make_problem(seed=2).posterior()
    Wp = np.random.default_rng(1).multivariate_normal(mu0, S0, size=(2, 2000))
    pilot = cp.ReferenceClass.from_draws(
        post._replace(constraints=[]), torch.as_tensor(Wp), settings={"method": "exact"}
    )
    with pytest.raises(ValueError, match=r"rank 6.*0\.750"):
        cp.calibrate(post, target_binding=0.8, pilot=pilot)
    v = np.clip(np.linalg.eigvalsh(C @ S0 @ C.T), 0, None)
    v[np.argsort(v)[:2]] = 0.0  # the exact V_c has rank 6; round-off only above
    exact_sigma = math.sqrt(solve_tolerance(v, 0.7))
    cal = cp.calibrate(post, target_binding=0.7, pilot=pilot)
    info = cal.calibration[post.constraints[0].name]
    assert info["jacobian_rank"] == 6 and info["k"] == 8
    # 4000 iid pilot draws: eigenvalues within a few % (SE ≈ √(2/4000) ≈ 2.2% each)
    assert info["sigma"] == pytest.approx(exact_sigma, rel=0.1)


def test_preservation_reports_exact_statistics_and_paired_run():
    x, y = _data(60)
    net = _mlp(torch.nn.ReLU)
    post = cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=5.0, check_center=False)
    post0 = cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=5.0, check_center=False)
    post.preserve(cp.ActivationSparsity("1", x[:8], tolerance=0.02))
    post.preserve(cp.LowRank("2.weight", rank=2, tolerance=0.1))
    post.preserve(cp.Quantized("4.bias", step=0.5, tolerance=0.1))
    ref = post.sample("nuts", chains=1, warmup=100, draws=60, seed=0, progress=False)
    ref0 = post0.sample("nuts", chains=1, warmup=100, draws=60, seed=0, progress=False)
    rep = ref.preservation(ref0, warn_user=False)
    sp = rep["sparsity:1"]
    # exact fraction active recomputed by hand at one draw
    w = torch.as_tensor(ref.flat()[0, 7])
    with torch.no_grad():
        a = torch.relu(
            torch.nn.functional.linear(
                x[:8], *[post.lifted.unflatten(w)[k] for k in ("0.weight", "0.bias")]
            )
        )
    assert ref.stat("exact/sparsity:1/fraction_active")[0, 7] == pytest.approx(
        float((a > 0).double().mean())
    )
    assert 0 <= sp["exact:fraction_active"] <= 1
    assert rep["low_rank:2.weight"]["exact:numerical_rank"] == pytest.approx(5.0)
    assert "shrinkage" in sp and "loss_cost" in sp and np.isfinite(sp["shrinkage"])
    assert "exact:fraction_on_grid" in rep["quantized:4.bias"]
    assert "exact:fraction_active" in str(rep)


# ------------------------------------------------------------------ bad input
def test_bad_constraint_input():
    x, y = _data()
    post = _post(x, y)
    with pytest.raises(ValueError, match="Nearest sites"):
        post.preserve(cp.ActivationSparsity("5", x[:3], tolerance=0.1))
    with pytest.raises(ValueError, match="does not feed"):
        post.preserve(cp.CircuitMap("3", "1", x[:3], tolerance=0.1))
    with pytest.raises(ValueError, match=r"probes need shape \[m, 3\]"):
        post.preserve(cp.CircuitMap("1", "3", x[:3, :2], tolerance=0.1))
    with pytest.raises(ValueError, match="tolerance must be a positive"):
        cp.LowRank("2.weight", tolerance=0.0)
    with pytest.raises(ValueError, match="strength must be a positive"):
        cp.Quantized("2.weight", 0.1, strength=-1.0)
    with pytest.raises(ValueError, match="non-finite"):
        post.preserve(cp.Feature(lambda v: v.output(x[:3]) / 0.0, tolerance=0.1))
    with pytest.raises(ValueError, match="does not depend on any lifted parameter"):
        post.preserve(
            cp.Feature(lambda v: x[:3].sum() * torch.ones(2, dtype=torch.float64), tolerance=0.1)
        )
    with pytest.raises(ValueError, match="interventions tensor has shape"):
        post.preserve(
            cp.CircuitMap("1", "3", x[:3], interventions=torch.zeros(3, 2), tolerance=0.1)
        )
    with pytest.raises(ValueError, match="not a parameter name"):
        post.preserve(cp.LowRank("2.wieght", tolerance=0.1))
    with pytest.raises(ValueError, match="needs a matrix"):
        post.preserve(cp.LowRank("2.bias", tolerance=0.1))

    class Pair(torch.nn.Module):
        def forward(self, z):
            return z, z

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.pair = Pair()

        def forward(self, z):
            return self.pair(self.lin(z))[0]

    p2 = cp.LocalPosterior(
        Net().double(), (x, y), cp.Categorical(), localization=1.0, check_center=False
    )
    with pytest.raises(TypeError, match="not a tensor"):
        p2.preserve(cp.Activations("pair", x[:3], tolerance=0.1))
