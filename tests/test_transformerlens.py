"""TransformerLens ``HookedTransformer`` as a first-class network (issue 13, point 1).

A 2-layer model built from a config with random initialisation and trained for a few
seconds on a copy task (the second half of each sequence repeats the first); nothing
is downloaded. Ground truths: the model itself (``net(x)``, ``run_with_cache``) and
autograd of the original full parameters.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from torch.func import functional_call

pytest.importorskip("transformer_lens")

import condpost as cp  # noqa: E402
from condpost import info, models  # noqa: E402
from condpost.likelihoods import CausalLM  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::condpost.SamplerWarning"),
    pytest.mark.filterwarnings("ignore::condpost.CenterWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

V, T = 8, 8
CFG = dict(n_layers=2, d_model=16, n_ctx=T, d_head=4, n_heads=4, d_mlp=32, d_vocab=V)


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = models.hooked_transformer(seed=0, **CFG)
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, V, (64, T // 2), generator=g)
        x = torch.cat([a, a], 1)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(80):
            loss = net(x, return_type="loss")
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
    finally:
        torch.set_num_threads(threads)
    return net, x


def _post(net, x, **kw):
    kw.setdefault("localization", 100.0)
    kw.setdefault("check_center", False)
    return cp.LocalPosterior(net, models.causal_lm_data(x), CausalLM(), **kw)


def test_head_slice_forward_is_exact_and_moves_only_that_head(trained):
    net, x = trained
    post = _post(net, x, include=models.heads(0, 1))
    lifted = post.lifted
    assert lifted.names == [
        "blocks.0.attn.W_Q[1]",
        "blocks.0.attn.W_O[1]",
        "blocks.0.attn.b_Q[1]",
        "blocks.0.attn.W_K[1]",
        "blocks.0.attn.W_V[1]",
        "blocks.0.attn.b_K[1]",
        "blocks.0.attn.b_V[1]",
    ]
    d_model, d_head = CFG["d_model"], CFG["d_head"]
    assert post.d == 4 * d_model * d_head + 3 * d_head
    # at w* the lifted forward is the model's own output, bit for bit
    with torch.no_grad():
        assert torch.equal(lifted.forward(post.center, x), net(x))
    # a move of the lifted vector changes exactly the head-1 slices
    w = post.center + 0.1 * torch.randn(post.d, generator=torch.Generator().manual_seed(1))
    full = lifted.full_params(lifted.unflatten(w))
    params = dict(net.named_parameters())
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
        p, q = params[f"blocks.0.attn.{name}"].detach(), full[f"blocks.0.attn.{name}"]
        assert torch.equal(q[[0, 2, 3]], p[[0, 2, 3]])
        assert bool((q[1] != p[1]).all())
        assert torch.equal(q[1], lifted.unflatten(w)[f"blocks.0.attn.{name}[1]"])
    for name in ("blocks.0.attn.b_O", "blocks.1.attn.W_Q", "unembed.W_U"):
        assert torch.equal(full[name], params[name].detach())


def test_slice_gradient_equals_full_gradient_restricted(trained):
    net, x = trained
    include = {"blocks.1.attn.W_V": 2, "blocks.0.mlp.W_in": (slice(None), slice(0, 16))}
    post = _post(net, x, include=include, dtype=torch.float64)
    assert post.lifted.names == ["blocks.0.mlp.W_in[:, 0:16]", "blocks.1.attn.W_V[2]"]
    w = post.center.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(post.loss(w), w)
    # the original in float64 (TransformerLens's own conversion, cfg.dtype included):
    # autograd w.r.t. every full parameter
    net64 = copy.deepcopy(net).to(torch.float64, print_details=False)
    full = {n: p.detach().requires_grad_(True) for n, p in net64.named_parameters()}
    bufs = dict(net64.named_buffers())
    xd, y = models.causal_lm_data(x)
    loss = CausalLM().nll(functional_call(net64, {**full, **bufs}, (xd,)), y).mean()
    grads = dict(zip(full, torch.autograd.grad(loss, list(full.values())), strict=True))
    parts = post.lifted.unflatten(g)
    np.testing.assert_allclose(
        parts["blocks.0.mlp.W_in[:, 0:16]"], grads["blocks.0.mlp.W_in"][:, 0:16], atol=1e-12
    )
    np.testing.assert_allclose(
        parts["blocks.1.attn.W_V[2]"], grads["blocks.1.attn.W_V"][2], atol=1e-12
    )
    # and one central finite difference through the posterior
    e = torch.zeros(post.d, dtype=torch.float64)
    i = int(torch.argmax(g.abs()))
    e[i] = 1e-5
    with torch.no_grad():
        fd = (post.loss(post.center + e) - post.loss(post.center - e)) / 2e-5
    assert abs(float(fd) - float(g[i])) < 1e-6 * max(1.0, abs(float(g[i])))


def test_hook_sites_equal_run_with_cache(trained):
    net, x = trained
    post = _post(net, x, include=models.heads(0, 1))
    sites = {
        "blocks.0.attn.hook_z[:, -1, 1]": lambda c: c["blocks.0.attn.hook_z"][:, -1, 1],
        models.site("blocks.1.attn.hook_pattern", head=2): lambda c: c[
            "blocks.1.attn.hook_pattern"
        ][:, 2],
        "blocks.0.hook_resid_post": lambda c: c["blocks.0.hook_resid_post"],
        models.site("blocks.0.mlp.hook_post", pos=3, unit=slice(0, 5)): lambda c: c[
            "blocks.0.mlp.hook_post"
        ][:, 3, 0:5],
    }
    assert models.site("blocks.1.attn.hook_pattern", head=2) == "blocks.1.attn.hook_pattern[:, 2]"
    with torch.no_grad():
        _, acts = post.lifted.call(post.lifted.unflatten(post.center), x, list(sites))
        _, cache = net.run_with_cache(x)
    for s, read in sites.items():
        want = read(cache)
        assert acts[s].shape == want.shape, s
        assert float((acts[s] - want).abs().max()) <= 1e-6, s
    # batched over draws (vmap) equals one draw at a time
    W = post.center + 0.05 * torch.randn(3, post.d, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, batched = post.lifted.call(post.lifted.unflatten(W), x[:4], list(sites))
        for k in range(3):
            _, one = post.lifted.call(post.lifted.unflatten(W[k]), x[:4], list(sites))
            for s in sites:
                assert torch.allclose(batched[s][k], one[s], atol=1e-6), s


def test_site_and_include_errors(trained):
    net, x = trained
    post = _post(net, x, include="blocks.0.attn.W_Q[1]")
    assert post.lifted.names == ["blocks.0.attn.W_Q[1]"]
    with pytest.raises(ValueError, match="hook names such as"):
        cp.Activations("blocks.0.attn.hook_zz", probes=x[:4], tolerance=0.1).bind(post)
    with pytest.raises(ValueError, match="batch of inputs"):
        cp.Activations("blocks.0.attn.hook_z[-1, 1]", probes=x[:4], tolerance=0.1).bind(post)
    with pytest.raises(ValueError, match="does not fit the activation"):
        post.lifted.call(
            post.lifted.unflatten(post.center), x[:2], ["blocks.0.attn.hook_z[:, 0, 9]"]
        )
    with pytest.raises(ValueError, match=r"does not fit parameter 'blocks.0.attn.W_Q' of shape"):
        _post(net, x, include={"blocks.0.attn.W_Q": 7})
    with pytest.raises(ValueError, match="already selected"):
        _post(net, x, include=["blocks.0.attn.W_Q[1]", "blocks.0.attn.W_Q[0:2]"])
    with pytest.raises(ValueError, match="matches no parameter"):
        _post(net, x, include={"blocks.0.attn.W_X": 1})
    # a whole parameter and a slice of it: the whole parameter
    both = _post(net, x, include=["blocks.0.attn.W_Q", "blocks.0.attn.W_Q[1]"])
    assert both.lifted.names == ["blocks.0.attn.W_Q"]


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_lens", None)
    with pytest.raises(ImportError, match=r"pip install condpost\[transformerlens\]"):
        models.hooked_transformer(**CFG)


def test_activations_constraint_on_hook_site_mi_and_llc(trained, tmp_path):
    net, x = trained
    site = "blocks.1.attn.hook_z[:, -1, 1]"
    post = _post(net, x, include=models.heads(1, 1), dtype=torch.float64)
    assert post.include == ["blocks.1.attn.W_[QKVO][1]", "blocks.1.attn.b_[QKV][1]"]
    post.preserve(cp.Activations(site, probes=x[:8], tolerance=0.05))
    b = post.constraints[0]
    assert b.k == 8 * CFG["d_head"]
    assert float(post.defects(post.center)[b.name]) == 0.0
    ref = post.sample(
        "sgld", chains=2, warmup=20, draws=40, step_size=2e-4, batch_size=32, seed=0,
        progress=False,
    )  # fmt: skip
    assert np.isfinite(ref.flat()).all()
    wts = ref.weights()
    assert list(wts) == post.lifted.names
    assert tuple(wts["blocks.1.attn.W_O[1]"].shape) == (2, 40, CFG["d_head"], CFG["d_model"])
    rep = ref.preservation(warn_user=False)
    assert np.isfinite(rep.rows[0]["binding"])
    # the defect the sampler recorded is the hook value's mean squared change
    w = torch.as_tensor(ref.flat()[0, -1], dtype=torch.float64)
    with torch.no_grad():
        a = ref.activations(x[:8], site, max_draws=None)
        _, one = post.lifted.call(post.lifted.unflatten(w), x[:8], [site])
        np.testing.assert_allclose(a[ref.num_draws - 1], one[site], atol=1e-10)
        d_at_w = float(post.defects(w)[b.name])
        assert d_at_w == pytest.approx(float(((one[site] - b.target) ** 2).mean()), rel=1e-10)
    lam = ref.llc(warn_user=False)
    assert np.isfinite(lam.mean) and np.isfinite(lam.stderr)
    # mutual information between two hook sites across the reference class
    res = info.mutual_information(
        ref,
        probes=x[:16],
        a="blocks.1.attn.hook_z[:, -1, 1]",
        b="blocks.1.hook_resid_post[:, -1]",
        target="observational",
        bootstrap=0,
        progress=False,
    )
    assert np.isfinite(res.value) and res.value >= 0
    # the run's config holds the selection as strings: saved and loaded back
    path = ref.save(tmp_path / "tl.npz")
    back = cp.ReferenceClass.load(path, posterior=post)
    np.testing.assert_array_equal(back.flat(), ref.flat())
    assert back.config["include"] == post.include


def test_llc_per_head_sgld(trained):
    net, x = trained
    post = _post(net, x, include=models.heads(0, 1))
    ref = post.sample(
        "sgld", chains=2, warmup=30, draws=60, step_size=2e-4, batch_size=32, seed=0,
        progress=False,
    )  # fmt: skip
    lam = ref.llc(warn_user=False)
    assert np.isfinite(lam.mean)
    assert abs(lam.mean) < post.d  # a per-head LLC, at most of the order of d/2
    # the redeclaration path (another nβ) keeps the slice selection
    assert post.with_nbeta(10.0).lifted.names == post.lifted.names
