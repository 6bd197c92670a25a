"""Hugging Face causal LMs as first-class networks, and the ``CausalLM`` likelihood (issue 13).

A 2-layer ``GPT2LMHeadModel`` built from a ``GPT2Config`` with random initialisation
and trained for a few seconds on a copy task; nothing is downloaded. Ground truths:
the model's own logits and hidden states, autograd of its full parameters, and a
hand-written masked cross-entropy.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

pytest.importorskip("transformers")

import condpost as cp  # noqa: E402
from condpost import info, models  # noqa: E402
from condpost.likelihoods import CausalLM  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::condpost.SamplerWarning"),
    pytest.mark.filterwarnings("ignore::condpost.CenterWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

V, T = 8, 8
CFG = dict(vocab_size=V, n_positions=T, n_embd=16, n_layer=2, n_head=4)


def _masks(x):
    right = torch.ones_like(x)
    right[::4, 6:] = 0  # right padding: the last two tokens of every 4th row
    left = torch.ones_like(x)
    left[1::4, :2] = 0  # left padding: the first two tokens of rows 1, 5, ...
    return right, left


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net = models.gpt2_lm(seed=0, **CFG)
        g = torch.Generator().manual_seed(0)
        a = torch.randint(0, V, (64, T // 2), generator=g)
        x = torch.cat([a, a], 1)
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(80):
            loss = net(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
    finally:
        torch.set_num_threads(threads)
    return net, x


def _post(net, data, **kw):
    kw.setdefault("localization", 100.0)
    kw.setdefault("check_center", False)
    return cp.LocalPosterior(net, data, CausalLM(), **kw)


def _masked_ce(logits, ids, mask):
    """Hand-written: per sequence, Σ_t −log p(ids[t+1] | ≤ t) over tokens t+1 with mask 1."""
    n, T_, _ = logits.shape
    out = torch.zeros(n, dtype=logits.dtype)
    for i in range(n):
        for t in range(T_ - 1):
            if mask[i, t + 1]:
                out[i] -= F.log_softmax(logits[i, t], -1)[ids[i, t + 1]]
    return out


def test_causal_lm_nll_is_the_masked_cross_entropy(trained):
    net, x = trained
    right, left = _masks(x)
    lik = CausalLM()
    for mask in (right, left, torch.ones_like(x)):
        xd, y = models.causal_lm_data(x, mask)
        assert int((y == -100).sum()) == int((mask == 0).sum())
        assert xd.shape == ((64, 2, T) if mask is left else (64, T))
        with torch.no_grad():
            logits = net(input_ids=x, attention_mask=mask).logits.double()
        want = _masked_ce(logits, x, mask)
        got = lik.nll(logits, y)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        # the fused minibatch mean (SG-MCMC's hot path) is the same number
        assert float(lik.mean_nll(logits, y)) == pytest.approx(float(want.mean()), rel=1e-12)
        raw, scale, const = lik.mean_nll_parts(logits, y)
        assert float(raw * scale + const) == pytest.approx(float(want.mean()), rel=1e-12)
        # and batched over chains: [C, n, T, V] logits give [C, n]
        two = lik.nll(torch.stack([logits, logits]), y)
        np.testing.assert_allclose(two[1], want, rtol=1e-12)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 8\)"):
        lik.validate(logits, torch.full_like(x, 9))
    with pytest.raises(TypeError, match="integer token labels"):
        lik.prepare_targets(x.float(), torch.float64)


def test_slice_forward_exact_at_w_star_and_gradient(trained):
    net, x = trained
    _, left = _masks(x)
    data = models.causal_lm_data(x, left)
    include = {
        "transformer.h.0.attn.c_attn.weight": (slice(None), slice(0, 16)),  # the query block
        "transformer.h.1.mlp.c_fc.weight": (slice(None), [3, 7, 11]),  # three neurons
    }
    post = _post(net, data, include=include)
    assert post.lifted.names == [
        "transformer.h.0.attn.c_attn.weight[:, 0:16]",
        "transformer.h.1.mlp.c_fc.weight[:, [3, 7, 11]]",
    ]
    assert post.d == 16 * 16 + 16 * 3
    with torch.no_grad():
        assert torch.equal(
            post.lifted.forward(post.center, data[0]), net(input_ids=x, attention_mask=left).logits
        )
    # float64: the slice's gradient is the full parameter's gradient restricted to it
    post64 = _post(net, data, include=include, dtype=torch.float64)
    w = post64.center.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(post64.loss(w), w)
    full = {n: p.detach().double().requires_grad_(True) for n, p in net.named_parameters()}
    kw = {"attention_mask": left, "use_cache": False}
    logits = functional_call(net, full, (x,), kw).logits
    loss = _masked_ce(logits, x, left).mean()
    grads = dict(zip(full, torch.autograd.grad(loss, list(full.values())), strict=True))
    parts = post64.lifted.unflatten(g)
    np.testing.assert_allclose(
        parts["transformer.h.0.attn.c_attn.weight[:, 0:16]"],
        grads["transformer.h.0.attn.c_attn.weight"][:, 0:16],
        atol=1e-12,
    )
    np.testing.assert_allclose(
        parts["transformer.h.1.mlp.c_fc.weight[:, [3, 7, 11]]"],
        grads["transformer.h.1.mlp.c_fc.weight"][:, [3, 7, 11]],
        atol=1e-12,
    )
    # the tied embedding: lifting wte moves the lm_head too (functional_call ties them)
    tied = _post(net, data, include="transformer.wte.weight[2]", dtype=torch.float64)
    w = tied.center + 0.1
    with torch.no_grad():
        a = tied.lifted.forward(w, data[0])
        wte = net.transformer.wte.weight.detach().double().clone()
        wte[2] += 0.1
        b = functional_call(net, {**full, "transformer.wte.weight": wte}, (x,), kw).logits
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_module_path_sites_take_the_hidden_state(trained):
    net, x = trained
    right, _ = _masks(x)
    data = models.causal_lm_data(x, right)
    post = _post(net, data, include="transformer.h.1.attn.c_attn.weight[:, 16:32]")
    got = {}
    handle = net.transformer.h[0].attn.register_forward_hook(
        lambda m, i, o: got.__setitem__("attn", o[0])
    )
    try:
        with torch.no_grad():
            out = net(input_ids=x, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    sites = ["transformer.h.0.attn", "transformer.h.0", "transformer.h.1[:, -1]", ""]
    with torch.no_grad():
        _, acts = post.lifted.call(post.lifted.unflatten(post.center), data[0], sites)
    assert torch.equal(acts["transformer.h.0.attn"], got["attn"])  # a tuple: its hidden state
    assert torch.equal(acts["transformer.h.0"], out.hidden_states[1])
    # the last block's output before the final layer norm
    with torch.no_grad():
        _, h1 = post.lifted.call(post.lifted.unflatten(post.center), data[0], ["transformer.h.1"])
    assert torch.equal(acts["transformer.h.1[:, -1]"], h1["transformer.h.1"][:, -1])
    assert torch.equal(acts[""], out.logits)  # the root: the logits of the ModelOutput
    # patching a tuple-returning module replaces its hidden state
    with torch.no_grad():
        center = post.lifted.unflatten(post.center)
        same, _ = post.lifted.call(center, data[0], replace={"transformer.h.0.attn": got["attn"]})
        zero, _ = post.lifted.call(
            center, data[0], replace={"transformer.h.0.attn[:, -1]": torch.zeros(64, 16)}
        )
    assert torch.equal(same, out.logits)
    assert torch.equal(zero[:, :-1], out.logits[:, :-1])  # causal: only the last position
    assert not torch.equal(zero[:, -1], out.logits[:, -1])


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install condpost\[hf\]"):
        models.gpt2_lm(**CFG)


def test_llc_constraint_and_mi_on_module_sites(trained):
    net, x = trained
    right, _ = _masks(x)
    data = models.causal_lm_data(x, right)
    post = _post(
        net, data, include={"transformer.h.0.attn.c_attn.weight": (slice(None), slice(0, 16))}
    )
    site = "transformer.h.0[:, -1]"
    post.preserve(cp.Activations(site, probes=x[:8], tolerance=0.1))
    ref = post.sample(
        "sgld", chains=2, warmup=30, draws=60, step_size=2e-4, batch_size=32, seed=0,
        progress=False,
    )  # fmt: skip
    assert np.isfinite(ref.flat()).all()
    lam = ref.llc(warn_user=False)
    assert np.isfinite(lam.mean) and np.isfinite(lam.stderr)
    assert np.isfinite(ref.preservation(warn_user=False).rows[0]["binding"])
    res = info.mutual_information(
        ref,
        probes=x[:16],
        a="transformer.h.0.attn[:, -1]",
        b="transformer.h.1[:, -1]",
        target="observational",
        bootstrap=0,
        progress=False,
    )
    assert np.isfinite(res.value)
