"""Bayesian influence functions and susceptibilities against the linear-Gaussian closed form.

On a bias-free ``nn.Linear`` with a ``Gaussian(scale=s)`` likelihood the posterior is
exactly N(μ, Σ) (tests/analytic.py) and each per-sample loss is quadratic in w:

    ℓ_i(w) = ‖y_i − Φ_i w‖²/(2s²) + const = ½ wᵀH_i w − h_iᵀw + c,  H_i = Φ_iᵀΦ_i/s²,

with Φ_i = I_k ⊗ x_iᵀ. For w ~ N(μ, Σ) two quadratic forms have

    Cov(ℓ_i, ℓ_j) = ½ tr(H_i Σ H_j Σ) + g_iᵀ Σ g_j,   g_i = ∇ℓ_i(μ) = −Φ_iᵀ(y_i − Φ_i μ)/s²,

(for one output this is (2(b_iᵀΣb_j)² + 4 m_i m_j b_iᵀΣb_j)/(4s⁴) with ℓ_i = (a_i + b_iᵀw)²/(2s²)),
and a linear observable O = cᵀw has Cov(O, ℓ_i) = cᵀΣ g_i (third central moments vanish).
Nothing below uses condpost to compute the truth.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from analytic import linear_net, make_problem

import condpost as cp
from condpost.influence import cov_with_stderr, per_sample_losses


# --------------------------------------------------------------------------- closed form
def _phi(prob, i):
    return np.kron(np.eye(prob.k), prob.X.numpy()[i][None, :])  # [k, d]


def closed_form(prob):
    """Exact Cov(ℓ_i, ℓ_j) [n, n] and the gradients g_i [n, d] at μ."""
    mu, Sigma = prob.posterior()
    Y = prob.Y.numpy()
    n = prob.n
    Phi = np.stack([_phi(prob, i) for i in range(n)])  # [n, k, d]
    H = np.einsum("nkd,nke->nde", Phi, Phi) / prob.s**2  # [n, d, d]
    r = Y - np.einsum("nkd,d->nk", Phi, mu)
    g = -np.einsum("nkd,nk->nd", Phi, r) / prob.s**2  # [n, d]
    HS = H @ Sigma  # [n, d, d]
    tr = np.einsum("iab,jba->ij", HS, HS)
    cov = 0.5 * tr + g @ Sigma @ g.T
    return cov, g


def _declare(prob):
    net = linear_net(prob)
    return cp.LocalPosterior(
        net,
        data=(prob.X, prob.Y),
        likelihood=cp.Gaussian(scale=prob.s),
        nbeta=prob.nbeta,
        localization=prob.gamma,
        check_center=False,
    )


def _exact_ref(prob, post, chains=4, draws=2000, seed=0):
    mu, Sigma = prob.posterior()
    rng = np.random.default_rng(seed)
    W = rng.multivariate_normal(mu, Sigma, size=(chains, draws))
    return cp.ReferenceClass.from_draws(post, torch.as_tensor(W), settings={"method": "exact"})


@pytest.fixture(scope="module")
def problem():
    prob = make_problem(n=40, din=3, k=2, s=0.5, seed=4, perturb=0.05)
    return prob, _declare(prob)


# --------------------------------------------------------------------------- tests
def test_closed_form_agrees_with_scalar_formula():
    """The matrix formula against the one-output formula of quadratic forms."""
    prob = make_problem(n=6, din=3, k=1, s=0.7, seed=2, perturb=0.1)
    mu, Sigma = prob.posterior()
    cov, _ = closed_form(prob)
    X, Y = prob.X.numpy(), prob.Y.numpy()[:, 0]
    # ℓ_i = (a_i + b_iᵀw)²/(2s²), a_i = y_i, b_i = −x_i
    m = Y - X @ mu
    B = X @ Sigma @ X.T
    ref = (2 * B**2 + 4 * np.outer(m, m) * B) / (4 * prob.s**4)
    np.testing.assert_allclose(cov, ref, rtol=1e-10, atol=1e-14)


def test_per_sample_losses_match_numpy(problem):
    prob, post = problem
    ref = _exact_ref(prob, post, chains=2, draws=50)
    L = per_sample_losses(ref, chunk=7)
    assert L.shape == (2, 50, prob.n) and L.dtype == np.float64
    W = ref.flat()
    X, Y = prob.X.numpy(), prob.Y.numpy()
    pred = np.einsum("csod,nd->csno", W.reshape(2, 50, prob.k, prob.din), X)
    const = prob.k * (np.log(prob.s) + 0.5 * np.log(2 * np.pi))
    expect = ((Y - pred) ** 2).sum(-1) / (2 * prob.s**2) + const
    np.testing.assert_allclose(L, expect, rtol=1e-10)
    # L_n is their mean
    np.testing.assert_allclose(L.mean(-1), ref.loss(), rtol=1e-10)
    # a query set and thinning
    Lq = per_sample_losses(ref, (prob.X[:5], prob.Y[:5]), max_draws=20)
    assert Lq.shape == (2, 10, 5)
    np.testing.assert_allclose(Lq, L[:, np.unique(np.linspace(0, 49, 10).round().astype(int)), :5])


def _check_against_truth(prob, ref, label, zmax=4.0):
    truth, g = closed_form(prob)
    mu, Sigma = prob.posterior()
    pick = np.arange(0, prob.n, 5)  # 8 query samples: 36 distinct entries
    inf = ref.influence((prob.X[pick], prob.Y[pick]))
    assert inf.kind == "matrix" and inf.cov.shape == (len(pick), len(pick))
    iu = np.triu_indices(len(pick))
    z = (inf.cov - truth[np.ix_(pick, pick)])[iu] / inf.stderr[iu]
    assert np.all(np.isfinite(z))
    assert np.abs(z).max() <= zmax, f"{label}: BIF z-scores {np.round(z, 2)}"
    # observable form: a linear observable O = cᵀw (callable of w) and L_n (a statistic)
    c = np.linspace(-1.0, 1.0, prob.d)
    ct = torch.as_tensor(c)
    inf_o = ref.influence(observable=lambda w: (w * ct).sum())
    z_o = (inf_o.cov - g @ Sigma @ c) / inf_o.stderr
    assert np.abs(z_o).max() <= zmax + 0.5, f"{label}: Cov(ℓ_i, cᵀw) z {np.round(z_o, 2)}"
    # susceptibilities of L_n and of cᵀw to two groups of training samples
    groups = {"first": list(range(0, 10)), "odd": list(range(1, prob.n, 2))}
    f = prob.nbeta / prob.n
    chi = ref.susceptibility("loss", groups)
    chi_lin = ref.susceptibility(lambda w: (w * ct).sum(), groups)
    zs = []
    for nm, gi in groups.items():
        exact = -f * truth[:, gi].sum(1).mean()  # Cov(L_n, Σ_g ℓ_i), L_n = mean_j ℓ_j
        zs.append((chi[nm] - exact) / chi.stderr[nm])
        exact_lin = -f * (c @ Sigma @ g[gi].sum(0))
        zs.append((chi_lin[nm] - exact_lin) / chi_lin.stderr[nm])
    assert np.abs(zs).max() <= zmax, f"{label}: susceptibility z-scores {np.round(zs, 2)}"
    return z, z_o, np.array(zs)


def test_bif_and_susceptibility_exact_draws(problem):
    prob, post = problem
    ref = _exact_ref(prob, post, chains=4, draws=2000, seed=1)
    z, z_o, zs = _check_against_truth(prob, ref, "exact draws")
    # independent draws: the z-scores look standard normal (36 + 40 + 4 values)
    allz = np.concatenate([z, z_o, zs])
    assert 0.6 < allz.std() < 1.5, allz.std()


def test_bif_and_susceptibility_nuts(problem):
    prob, post = problem
    ref = post.sample("nuts", chains=4, warmup=300, draws=1500, seed=3, progress=False)
    _check_against_truth(prob, ref, "NUTS")


def test_topk_form_matches_matrix(problem):
    prob, post = problem
    ref = _exact_ref(prob, post, chains=2, draws=300, seed=2)
    full = ref.influence()
    top = ref.influence(matrix=False, k=5)
    assert top.kind == "topk" and top.index.shape == (prob.n, 5)
    for i in range(prob.n):
        j = top.index[i]
        np.testing.assert_allclose(top.cov[i], full.cov[i, j])
        np.testing.assert_allclose(top.stderr[i], full.stderr[i, j])
        assert np.abs(full.cov[i]).max() == pytest.approx(np.abs(top.cov[i, 0]))
    # the matrix is symmetric; the response is −(nβ/n)·cov
    np.testing.assert_allclose(full.cov, full.cov.T, rtol=1e-12)
    np.testing.assert_allclose(full.response, -prob.nbeta / prob.n * full.cov)


def test_stderr_calibration_autocorrelated():
    """Batch-means standard errors on AR(1) chains (ρ = 0.9) of a bivariate Gaussian with
    known covariance: over 300 replicates the z-scores have SD near 1 (i.i.d. formulas
    would give SD ≈ 3 here)."""
    rng = np.random.default_rng(0)
    rho, C, S, R = 0.9, 4, 1000, 300
    L = np.linalg.cholesky(np.array([[1.0, 0.6], [0.6, 2.0]]))
    true = 0.6
    zs = []
    for _ in range(R):
        e = rng.standard_normal((C, S, 2)) @ L.T
        x = np.empty_like(e)
        x[:, 0] = e[:, 0]
        a = np.sqrt(1 - rho**2)
        for t in range(1, S):
            x[:, t] = rho * x[:, t - 1] + a * e[:, t]
        cov, se = cov_with_stderr(x[..., 0], x[..., 1])
        zs.append((cov - true) / se)
    zs = np.array(zs)
    assert 0.85 < zs.std() < 1.3, zs.std()
    assert abs(zs.mean()) < 0.25, zs.mean()


def test_observable_errors(problem):
    prob, post = problem
    ref = _exact_ref(prob, post, chains=2, draws=20)
    with pytest.raises(ValueError, match="no per-draw statistic"):
        ref.influence(observable="defect/nothing")
    with pytest.raises(ValueError, match="shape"):
        ref.susceptibility(np.zeros((3, 3)), {"a": [0]})
    with pytest.raises(IndexError):
        ref.susceptibility("loss", {"a": [prob.n]})
    with pytest.raises(TypeError, match="query"):
        ref.influence(query=prob.X)


# --------------------------------------------------------------------------- per component
def _refined_gaussian(prob, rows, C=None, sigma=None):
    """The weight-refined posterior of the rows ``rows`` of W (the rest at w*), exactly:
    N(μ, Σ) embedded in the full d-dimensional space (Σ zero outside the block), with an
    optional linear constraint exp(−‖C(w − w*)‖²/(2σ²))."""
    A = prob.A()
    g = prob.grad_at_star()
    idx = np.concatenate([np.arange(r * prob.din, (r + 1) * prob.din) for r in rows])
    P = A[np.ix_(idx, idx)] + prob.gamma * np.eye(len(idx))
    if C is not None:
        P = P + C[:, idx].T @ C[:, idx] / sigma**2  # the constraint vanishes at w*
    S = np.linalg.inv(P)
    mu = prob.w_star.copy()
    mu[idx] -= S @ g[idx]
    Sigma = np.zeros((prob.d, prob.d))
    Sigma[np.ix_(idx, idx)] = S
    return mu, Sigma


def _quad_cov(H1, b1, H2, b2, Sigma):
    """Cov(q1, q2) for q = ½wᵀHw + bᵀw under N(μ, Σ), with b the gradient at μ."""
    return 0.5 * np.trace(H1 @ Sigma @ H2 @ Sigma) + b1 @ Sigma @ b2


def test_component_susceptibilities_closed_form():
    """Per-component χ of L_n and of a constraint's defect against the exact weight-refined
    posterior of a linear-Gaussian model (components: the rows of W; MALA draws, losses
    recorded along the chains). A constraint on output 0 does not depend on row 1: there
    its defect is 0 and χ = 0 exactly."""
    from condpost.influence import component_susceptibilities

    prob = make_problem(n=40, din=3, k=2, s=0.5, seed=4, perturb=0.05)
    post = _declare(prob)
    probes = torch.as_tensor(np.random.default_rng(0).standard_normal((4, prob.din)))
    sigma = 0.3
    post.preserve(cp.Activations("[:, 0]", probes=probes, tolerance=sigma, name="out0"))
    # the constraint on W: output 0 at the probes, C = probes on row 0
    C = np.zeros((len(probes), prob.d))
    C[:, : prob.din] = probes.numpy()
    groups = {"first": list(range(0, 10)), "odd": list(range(1, prob.n, 2))}
    comps = {"row0": "weight[0]", "row1": "weight[1]", "all": None}
    kw = dict(chains=2, warmup=200, draws=500, seed=5, progress=False)
    tab = component_susceptibilities(
        post, comps, groups, observable="loss", method="mala", keep_refs=True, **kw
    )
    assert tab.components == list(comps) and tab.groups == list(groups)
    assert tab.dims == {"row0": 3, "row1": 3, "all": 6}
    # the defect's χ from the same draws; on row 1 (which the constraint does not see)
    # it is 0 without sampling
    chi_d = {c: tab.refs[c].susceptibility("defect/out0", groups) for c in ("row0", "all")}
    tab_d = component_susceptibilities(
        post, {"row1": "weight[1]"}, groups, observable="defect/out0", method="mala", **kw
    )
    assert [b.name for b in tab.refs["row0"].posterior.constraints] == ["out0"]
    assert tab.refs["row1"].posterior.constraints == []
    # closed form: ℓ_i = ½wᵀH_iw + ..., D = ‖C(w − w*)‖²/k
    Y = prob.Y.numpy()
    Phi = np.stack([_phi(prob, i) for i in range(prob.n)])
    H = np.einsum("nkd,nke->nde", Phi, Phi) / prob.s**2
    HD = 2 * C.T @ C / len(probes)
    f = prob.nbeta / prob.n
    zs, exacts = [], {}
    for name, rows in (("row0", [0]), ("row1", [1]), ("all", [0, 1])):
        mu, Sigma = _refined_gaussian(prob, rows, C, sigma)
        r = Y - np.einsum("nkd,d->nk", Phi, mu)
        gl = -np.einsum("nkd,nk->nd", Phi, r) / prob.s**2  # ∇ℓ_i(μ)
        gD = HD @ (mu - prob.w_star)
        HL, gL = H.mean(0), gl.mean(0)
        for gname, gi in groups.items():
            Hg, bg = H[gi].sum(0), gl[gi].sum(0)
            exact = exacts[name, gname] = -f * _quad_cov(HL, gL, Hg, bg, Sigma)
            zs.append(
                (tab[name, gname] - exact)
                / tab.stderr[list(comps).index(name), list(groups).index(gname)]
            )
            exact_d = -f * _quad_cov(HD, gD, Hg, bg, Sigma)
            if name == "row1":  # the defect is a constant here
                assert exact_d == 0.0
                assert tab_d["row1", gname] == 0.0 and tab_d.stderr[0, 0] == 0.0
            else:
                zs.append((chi_d[name][gname] - exact_d) / chi_d[name].stderr[gname])
    assert np.all(np.isfinite(zs)) and np.abs(zs).max() <= 4.0, np.round(zs, 2)
    # the defect of a constraint row 1 cannot move is noted, not sampled
    assert "row1" in tab_d.notes and tab_d.results["row1"].sums is None
    # the table: a readable grid, a long data frame, contrasts with their own error
    text = str(tab)
    assert "row0" in text and "first (n=10)" in text
    assert "note: row1" in str(tab_d)
    df = tab.to_dataframe()
    assert df.loc[("row0", "odd"), "chi"] == tab["row0", "odd"]
    np.testing.assert_allclose(df["chi"].unstack().loc[list(comps), list(groups)], tab.chi)
    c = tab.contrast("all", "odd", "first")
    assert c.value == pytest.approx(tab["all", "odd"] - tab["all", "first"])
    exact_c = exacts["all", "odd"] - exacts["all", "first"]
    assert abs(c.value - exact_c) <= 4 * c.stderr, (c.value, exact_c, c.stderr)


# --------------------------------------------------------------------------- a transformer
# Two sub-tasks on disjoint vocabularies, told apart by a task token: the sequence is
# [a, b, task, pad]; the logits at the task token predict a (task A, a, b ∈ 0..7) or b
# (task B, a, b ∈ 8..15). A 1-layer TransformerLens model (14,131 weights) solves both
# by attending from the task token to the right operand.
_P, _V = 16, 19
_TL_CFG = dict(n_layers=1, d_model=32, n_ctx=4, d_head=8, n_heads=4, d_mlp=128, d_vocab=_V)


def _mixture(n, seed):
    g = torch.Generator().manual_seed(seed)
    task = (torch.rand(n, generator=g) >= 0.5).long()
    lo = 8 * task  # task A: 0..7, task B: 8..15
    a = lo + torch.randint(0, 8, (n,), generator=g)
    b = lo + torch.randint(0, 8, (n,), generator=g)
    x = torch.stack([a, b, _P + task, torch.full_like(a, _P + 2)], 1)
    y = torch.full_like(x, -100)
    y[:, 3] = torch.where(task == 0, a, b)
    return x, y, task


def circuit_susceptibility(seed, *, n=512, train_steps=30, draws=600, m=192, heads=()):
    """Train the mixture transformer, declare the circuit of task A (the attention output
    at the task token on 32 held-out task-A probes, tolerance 5: a loose constraint, so
    the defect fluctuates with the posterior) and return the per-component table of
    χ(defect) for the groups "A" (m task-A training samples) and "rand" (m random
    training samples), components "attn" (the four heads) and "head<h>" for h in heads."""
    from condpost import models
    from condpost.influence import component_susceptibilities
    from condpost.likelihoods import CausalLM

    torch.manual_seed(seed)
    net = models.hooked_transformer(seed=seed, **_TL_CFG)
    x, y, task = _mixture(n, seed)
    lik = CausalLM()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(train_steps):
        loss = lik.nll(net(x), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xp, _, tp = _mixture(400, 1000 + seed)
    post = cp.LocalPosterior(net, (x, y), lik, localization=100.0, check_center=False)
    post.preserve(
        cp.Activations("blocks.0.hook_attn_out[:, 2]", probes=xp[tp == 0][:32], tolerance=5.0,
                       name="circuit_A")
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    A = np.flatnonzero(task.numpy() == 0)
    groups = {"A": rng.choice(A, m, replace=False), "rand": rng.choice(n, m, replace=False)}
    comps = {"attn": models.heads(0, slice(None))}
    comps.update({f"head{h}": models.heads(0, h) for h in heads})
    tab = component_susceptibilities(
        post, comps, groups, observable="defect/circuit_A", method="sgld",
        chains=4, warmup=200, draws=draws, step_size=1e-4, batch_size=64, seed=seed,
        record_every=2, progress=False,
    )  # fmt: skip
    return post, tab


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::condpost.SamplerWarning")
def test_circuit_group_has_larger_susceptibility_transformer():
    """Up-weighting the task-A training samples lowers the task-A circuit's defect
    (χ_A < 0 beyond 2.5 standard errors; measured −3.8, −3.2, −3.6 SE for seeds 0, 1, 2),
    and more than a random group of the same size does (|χ_A| − |χ_rand| > 0; measured
    +1.5, +3.3, +1.4 SE of the difference for seeds 0, 1, 2: positive for every seed, but
    not beyond 2 SE robustly at these draws, so 2 SE is not asserted). docs/influence.md."""
    pytest.importorskip("transformer_lens")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        post, tab = circuit_susceptibility(0)
    finally:
        torch.set_num_threads(threads)
    assert post.d == 14131
    assert tab.dims == {"attn": 4192}
    z_a = tab.z[0, 0]
    assert z_a < -2.5, str(tab)  # up-weighting task A holds its circuit in place
    c = tab.contrast("attn", "A", "rand", absolute=True)
    assert c.z > 0, str(c)
