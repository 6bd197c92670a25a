"""MI estimates that respect what the data can say (issue 12).

Ensembles of known mutual information, built here on small networks whose lifted
weights are drawn from a Gaussian chosen in the test (``ReferenceClass.from_draws``),
so that the law of ``(X, W)`` and hence the MI is known in closed form or by 1-D
quadrature (SciPy, never condpost):

* discrete × continuous: a site that takes 4 values over 40 probes, read through
  additive Gaussian weight noise (Ross k-NN; the side is detected from the distinct
  rows of the site, not from the number of probes);
* many-valued discrete: 24 values × continuous (Ross) and 24 × 12 values, both sides
  functions of the probe (plug-in with the Miller–Madow correction);
* high-dimensional, low intrinsic dimension: a 96-dimensional site of rank 2 against a
  32-dimensional non-linear readout of rank 2 (projection onto principal components).

Tolerance: 3 bootstrap standard errors or 0.05 nats, whichever is larger.

Then a one-layer modular-addition transformer (p = 23), trained here in seconds, with its
MLP lifted: every target gives a value at or below its resolvable bound, and the
observational and channel targets agree where theory says they must (no lifted weight
acts before site a, so ``A' = A(x)`` for every member of the class and the two targets
are the same quantity, docs/theory.md §3.4.5).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special
from torch import nn

import condpost as cp
from condpost import info
from condpost.info import ensemble
from condpost.reference import ReferenceClass


def mixture_mi_1d(means, sd) -> float:
    """I(J;B), J uniform, B | J=j ~ N(means[j], sd²), by quadrature."""
    means = np.asarray(means, float)
    m = len(means)

    def logpdf(b, j):
        return -0.5 * ((b - means[j]) / sd) ** 2 - math.log(sd * math.sqrt(2 * math.pi))

    total = 0.0
    for j in range(m):

        def f(b, j=j):
            lj = logpdf(b, j)
            lmix = special.logsumexp([logpdf(b, k) for k in range(m)]) - math.log(m)
            return math.exp(lj) * (lj - lmix)

        total += integrate.quad(f, means[j] - 12 * sd, means[j] + 12 * sd, limit=200)[0] / m
    return total


def _ok(res, exact):
    assert res.value <= res.upper_bound + 1e-12
    assert abs(res.value - exact) <= max(3 * res.stderr, 0.05), (res.value, exact, res.stderr)


def _post(net, x, include=None):
    # the declaration's data play no part in these tests (the draws are Gaussian, chosen
    # here); 16 points keep the per-draw statistics of from_draws cheap
    x = x[:16]
    with torch.no_grad():
        y = torch.zeros_like(net(x))
    return cp.LocalPosterior(
        net,
        (x, y),
        cp.Gaussian(scale=1.0),
        localization=1.0,
        include=include,
        check_center=False,
    )


def _gaussian_ref(post, sd, S, seed=0):
    """S iid draws of the lifted weights from N(w*, diag(sd²)) (2 chains)."""
    g = torch.Generator().manual_seed(seed)
    sd = torch.as_tensor(sd, dtype=torch.float64).expand(post.d)
    W = post.center.double() + sd * torch.randn(2, S // 2, post.d, generator=g, dtype=torch.float64)
    return ReferenceClass.from_draws(post, W, settings={"method": "exact gaussian"})


class LevelNet(nn.Module):
    """A = x[:, :1] (a function of the probe); B = A + w with a lifted scalar w."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.site_a = nn.Identity()
        self.site_b = nn.Identity()

    def forward(self, x):
        return self.site_b(self.site_a(x[:, :1]) + self.w)


def _level_probes(levels, per_level, seed):
    g = torch.Generator().manual_seed(seed)
    lv = torch.as_tensor(levels, dtype=torch.float64).repeat_interleave(per_level)
    return torch.stack([lv, torch.randn(lv.shape[0], generator=g, dtype=torch.float64)], 1)


# ------------------------------------------------------------------- known-MI ensembles


def test_discrete_by_continuous_detected_from_the_site_values():
    """4 values over 40 distinct probes: Ross on 4 labels, bound log 4, exact by quadrature."""
    levels, sd = [-1.5, -0.5, 0.5, 1.5], 0.6
    probes = _level_probes(levels, 10, 1)
    post = _post(LevelNet(), probes)
    ref = _gaussian_ref(post, sd, 2000)
    exact = mixture_mi_1d(levels, sd)
    kw = dict(probes=probes, a="site_a", b="site_b", bootstrap=40, progress=False)
    obs = info.mutual_information(ref, target="observational", **kw)
    assert obs.estimator == "ross"
    assert obs.settings["sides"]["A"]["values"] == 4  # distinct rows of the site, not 40 probes
    assert obs.upper_bound == pytest.approx(math.log(4)) and not obs.bound
    assert "ross" in obs.notes[0] and "K = 4" in obs.notes[0]
    _ok(obs, exact)
    # no lifted weight acts before site_a: the channel target is the same quantity
    ch = info.mutual_information(ref, target="channel", **kw)
    assert ch.estimator == "ross" and ch.n == obs.n
    _ok(ch, exact)


def test_many_valued_discrete_by_continuous():
    """24 values, 100 pairs per value: Ross within 3 SE / 0.05 of the 24-component mixture."""
    levels, sd = np.arange(24.0), 0.7
    probes = _level_probes(levels, 2, 2)
    post = _post(LevelNet(), probes)
    ref = _gaussian_ref(post, sd, 2400, seed=1)
    exact = mixture_mi_1d(levels, sd)
    res = info.mutual_information(
        ref, probes=probes, a="site_a", b="site_b", bootstrap=40, progress=False
    )
    assert res.estimator == "ross" and res.settings["sides"]["A"]["values"] == 24
    _ok(res, exact)


class ModNet(nn.Module):
    """A = u, B = (u + v) mod 12 for probes (u, v): both functions of the probe."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.site_a = nn.Identity()
        self.site_b = nn.Identity()

    def forward(self, x):
        a = self.site_a(x[:, :1])
        b = self.site_b(torch.remainder(x[:, :1] + x[:, 1:], 12.0))
        return a + b + self.w


def test_many_valued_discrete_by_discrete_plugin():
    """u ∈ 0..23, v ∈ 0..5 uniform: I(u; (u+v) mod 12) = log 12 − log 6 = log 2 exactly.

    144 probes, 2,000 pairs: the balanced assignment makes the pairs' law of the probes
    uniform, so the plain plug-in has no sampling bias (Miller–Madow would subtract
    (24 + 12 − 144 − 1)/(2·2000) ≈ 0.027 nats too much).
    """
    u, v = torch.meshgrid(torch.arange(24.0), torch.arange(6.0), indexing="ij")
    probes = torch.stack([u.reshape(-1), v.reshape(-1)], 1).double()
    post = _post(ModNet(), probes)
    ref = _gaussian_ref(post, 0.1, 2000, seed=2)
    kw = dict(probes=probes, a="site_a", b="site_b", bootstrap=40, progress=False)
    res = info.mutual_information(ref, **kw)
    assert res.estimator == "plugin" and not res.settings["estimator_settings"]["miller_madow"]
    assert res.upper_bound == pytest.approx(math.log(12))
    _ok(res, math.log(2))


class LowRankNet(nn.Module):
    """A = U(x + α) ∈ R⁹⁶ (rank r), B = V g(U⁺A + β) ∈ R³² (rank r), g(z) = z + z³/3.

    α, β are lifted; U⁺ = pinv(U) recovers x + α exactly, g is strictly increasing and V is
    injective on R^r, so I(A;B) = I(x + α; x + α + β) = (r/2) log(1 + (1 + s_α²)/s_β²).
    """

    def __init__(self, r=2, da=96, db=32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        U = torch.randn(da, r, generator=g, dtype=torch.float64)
        V = torch.randn(db, r, generator=g, dtype=torch.float64)
        self.alpha = nn.Parameter(torch.zeros(r, dtype=torch.float64))
        self.beta = nn.Parameter(torch.zeros(r, dtype=torch.float64))
        self.register_buffer("U", U)
        self.register_buffer("Up", torch.linalg.pinv(U))
        self.register_buffer("V", V)
        self.site_a = nn.Identity()
        self.site_b = nn.Identity()

    def forward(self, x):
        a = self.site_a((x + self.alpha) @ self.U.T)
        z = a @ self.Up.T + self.beta
        return self.site_b((z + z**3 / 3) @ self.V.T)


def test_high_dimensional_low_intrinsic_dimension():
    """96 × 32 dimensions, N = 1,600 pairs (issue 12's sizes): the sides are projected onto
    their principal components (2 each, all the variance) and the value is within
    3 SE / 0.05 nats of the exact 0.811 nats; it can never be above log N."""
    r, sa, sb = 2, 0.5, 1.0
    exact = 0.5 * r * math.log(1 + (1 + sa**2) / sb**2)
    g = torch.Generator().manual_seed(3)
    probes = torch.randn(1600, r, generator=g, dtype=torch.float64)
    post = _post(LowRankNet(r), probes)
    ref = _gaussian_ref(post, [sa] * r + [sb] * r, 1600, seed=3)
    res = info.mutual_information(
        ref, probes=probes, a="site_a", b="site_b", bootstrap=30, progress=False
    )
    assert res.estimator == "pca_copula_ksg"
    est = res.settings["estimator_settings"]
    assert est["x_projection"]["components"] == 2 and est["y_projection"]["components"] == 2
    assert est["x_projection"]["variance_kept"] > 0.999
    assert any("principal component" in n for n in res.notes)
    assert res.upper_bound == pytest.approx(math.log(1600))
    _ok(res, exact)


# ------------------------------------------------------------------- preconditions first


def test_ross_preconditions_checked_before_any_forward_pass(monkeypatch):
    """50 probes and 200 draws: each bootstrap half-sample has only 2 pairs per probe, fewer
    than k + 1 = 4. The error names k, the pairs needed and bootstrap, and comes before
    a single activation is computed (it used to come from inside the bootstrap)."""
    probes = _level_probes(np.arange(50.0), 1, 4)
    post = _post(LevelNet(), probes)
    ref = _gaussian_ref(post, 0.5, 200)
    calls = []
    orig = ensemble._Forward.__call__
    monkeypatch.setattr(
        ensemble._Forward, "__call__", lambda *a, **k: calls.append(1) or orig(*a, **k)
    )
    with pytest.raises(ValueError, match=r"k = 3.*pairs ≥ 400.*k=1.*bootstrap=0"):
        info.mutual_information(ref, probes=probes, b="site_b", target="input", progress=False)
    assert calls == []
    # a site that is a function of the probe with too few pairs per value: refused before
    # the pairs are formed, with the fix
    with pytest.raises(ValueError, match=r"A \(site a='site_a'.*K = 50.*Fix"):
        info.mutual_information(
            ref, probes=probes, a="site_a", b="site_b", draws=80, progress=False
        )
    # the fixes work: k=1, or no bootstrap
    r1 = info.mutual_information(
        ref, probes=probes, b="site_b", target="input", k=1, bootstrap=20, progress=False
    )
    r0 = info.mutual_information(
        ref, probes=probes, b="site_b", target="input", bootstrap=0, progress=False
    )
    for r in (r1, r0):
        assert r.value <= math.log(50)


def test_array_knn_estimate_never_above_log_n():
    """copula-KSG's surrogate correction can exceed log N on near-deterministic data; the
    result is then the labelled bound log N, with a warning."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3))
    y = x @ rng.standard_normal((3, 3)) + 1e-9 * rng.standard_normal((200, 3))
    with pytest.warns(info.InfoWarning, match="above log N"):
        r = info.mutual_information(x, y, "copula_ksg", stderr=None)
    assert r.bound and r.value == pytest.approx(math.log(200)) == pytest.approx(r.upper_bound)
    assert r.details["raw_value"] > math.log(200)
    assert "bound" in repr(r)


# ------------------------------------------------------------------- transformer


class _Head(nn.Module):
    def __init__(self, d, dh):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, dh, bias=False) for _ in range(3))
        self.o = nn.Linear(dh, d, bias=False)

    def forward(self, x):
        att = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(self.q.out_features)
        mask = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool).tril()
        return self.o(att.masked_fill(~mask, float("-inf")).softmax(-1) @ self.v(x))


class ModAdd(nn.Module):
    """One-layer transformer on [a, b, =]; hooks at the embedding, attention and MLP outputs."""

    def __init__(self, p=23, d=32, heads=2, d_mlp=64):
        super().__init__()
        self.embed = nn.Embedding(p + 1, d)
        self.pos = nn.Parameter(0.02 * torch.randn(3, d))
        self.hook_embed = nn.Identity()
        self.heads = nn.ModuleList(_Head(d, d // heads) for _ in range(heads))
        self.hook_attn_out = nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(d, d_mlp), nn.GELU(), nn.Linear(d_mlp, d))
        self.hook_mlp_out = nn.Identity()
        self.unembed = nn.Linear(d, p)

    def forward(self, tokens):
        x = self.hook_embed(self.embed(tokens) + self.pos)
        att = self.heads[0](x)
        for h in self.heads[1:]:
            att = att + h(x)
        x = x + self.hook_attn_out(att[..., -1:, :].squeeze(-2)).unsqueeze(-2)
        x = x[..., -1, :]
        x = x + self.hook_mlp_out(self.mlp(x))
        return self.unembed(x)


@pytest.fixture(scope="module")
def modadd():
    p = 23
    torch.manual_seed(0)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1), torch.full((p * p,), p)], 1)
    y = (a + b).reshape(-1) % p
    net = ModAdd(p)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(400):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((net(x).argmax(-1) == y).float().mean())
    assert acc > 0.95, acc
    # declared on 64 of the 529 sums: the draws below are Gaussian around w* (chosen here),
    # so the data only set what from_draws evaluates per draw
    post = cp.LocalPosterior(
        net,
        (x[:64], y[:64]),
        cp.Categorical(),
        nbeta=100.0,
        localization=100.0,
        include="mlp.*",
        check_center=False,
    )
    assert post.d == 32 * 64 + 64 + 64 * 32 + 32  # 4,192 lifted weights, as in issue 12
    ref = _gaussian_ref(post, 0.02, 2400, seed=5)
    return post, ref, x


def test_transformer_every_target_at_or_below_its_bound(modadd):
    post, ref, x = modadd
    kw = dict(bootstrap=20, progress=False)
    out = {}
    # I(X;B) over 64 probes (X uniform on them): bound log 64
    sub = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:64]]
    out["input"] = info.mutual_information(ref, probes=sub, b="hook_mlp_out", target="input", **kw)
    assert out["input"].upper_bound == pytest.approx(math.log(64))
    # issue 12's channel: attention output (no lifted weight before it) → MLP output
    ab = dict(probes=x, a="hook_attn_out", b="hook_mlp_out", **kw)
    out["obs"] = info.mutual_information(ref, target="observational", **ab)
    out["channel"] = info.mutual_information(ref, target="channel", **ab)
    K = out["obs"].settings["sides"]["A"]["values"]
    assert 2 <= K <= 529
    for r in (out["obs"], out["channel"]):
        assert r.estimator == "ross"
        assert r.upper_bound <= math.log(K) + 1e-12 <= math.log(529) + 1e-12
    # high-dimensional continuous: the MLP's 64 hidden units against its 32 outputs
    out["hidden"] = info.mutual_information(
        ref, probes=x, a="mlp.1", b="hook_mlp_out", target="observational", **kw
    )
    assert out["hidden"].estimator == "pca_copula_ksg"
    assert out["hidden"].upper_bound == pytest.approx(math.log(2400))
    # two sites no lifted weight acts on: plug-in, bound log K
    out["frozen"] = info.mutual_information(
        ref, probes=x, a="hook_embed", b="hook_attn_out", target="observational", **kw
    )
    assert out["frozen"].estimator == "plugin"
    for name, r in out.items():
        assert r.value <= r.upper_bound + 1e-12, (name, r)
        assert np.isfinite(r.stderr), (name, r)
    # observational and channel are the same quantity here (A' = A(x) for every member)
    o, c = out["obs"], out["channel"]
    assert abs(o.value - c.value) <= 2 * math.hypot(o.stderr, c.stderr) + 1e-9, (o, c)


def test_transformer_channel_errors(modadd):
    post, ref, x = modadd
    # swapped: the MLP output does not feed the attention output
    with pytest.raises(
        ValueError, match="a='hook_mlp_out' to feed site b='hook_attn_out'.*Swap them"
    ):
        info.mutual_information(
            ref, probes=x, a="hook_mlp_out", b="hook_attn_out", target="channel", progress=False
        )
    # a continuous estimator on the tied attention side (the 11.18-nat failure) is refused
    with pytest.raises(ValueError, match="finitely many values.*'ross'"):
        info.mutual_information(
            ref,
            probes=x,
            a="hook_attn_out",
            b="hook_mlp_out",
            target="channel",
            estimator="copula_ksg",
            progress=False,
        )
