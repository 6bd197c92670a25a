"""The model of the precision-scale study (``examples/precision_scale.toml``).

A one-layer transformer trained here on modular addition ``(a + b) mod p`` (every pair
``[a, b, =]``, no download), and the observables the study measures on each reference
class. ``condpost run examples/precision_scale.toml`` imports this module through the
file's ``[model] function = "precision_scale:model"``.

Sites (module paths) of the circuit, in the order they fire:

* ``hook_embed``: token + position embedding ``[batch, 3, d]``;
* ``hook_attn_out``: the attention output read at the ``=`` position ``[batch, d]``;
* ``mlp.1``: the MLP's neurons (after GELU) ``[batch, d_mlp]``;
* ``hook_mlp_out``: the MLP output ``[batch, d]``; the unembedding follows.

Trained on all ``p²`` sums, the network learns the known Fourier-feature algorithm
(Nanda et al. 2023): its embedding concentrates on a few *key frequencies* ``k``
(``cos(2πka/p)``, ``sin(2πka/p)``) and its neurons respond to ``a + b`` through the same
frequencies. The observables here measure, per draw, how much of that structure a member
of the reference class keeps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ModAdd",
    "model",
    "accuracy",
    "embed_fourier",
    "neuron_fourier",
    "keys_kept",
    "key_frequencies",
]


class _Head(nn.Module):
    def __init__(self, d: int, dh: int) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, dh, bias=False) for _ in range(3))
        self.o = nn.Linear(dh, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(self.q.out_features)
        mask = torch.ones(x.shape[-2], x.shape[-2], dtype=torch.bool, device=x.device).tril()
        return self.o(att.masked_fill(~mask, float("-inf")).softmax(-1) @ self.v(x))


class ModAdd(nn.Module):
    """One-layer transformer on ``[a, b, =]`` with hooks on the circuit's sites."""

    def __init__(self, p: int = 23, d: int = 32, heads: int = 2, d_mlp: int = 64) -> None:
        super().__init__()
        self.p = p
        self.embed = nn.Embedding(p + 1, d)
        self.pos = nn.Parameter(0.02 * torch.randn(3, d))
        self.hook_embed = nn.Identity()
        self.heads = nn.ModuleList(_Head(d, d // heads) for _ in range(heads))
        self.hook_attn_out = nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(d, d_mlp), nn.GELU(), nn.Linear(d_mlp, d))
        self.hook_mlp_out = nn.Identity()
        self.unembed = nn.Linear(d, p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.hook_embed(self.embed(tokens) + self.pos)
        att = self.heads[0](x)
        for h in self.heads[1:]:
            att = att + h(x)
        r = x[..., -1, :] + self.hook_attn_out(att[..., -1, :])
        r = r + self.hook_mlp_out(self.mlp(r))
        return self.unembed(r)


def modular_addition(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    x = torch.stack([a.reshape(-1), b.reshape(-1), torch.full((p * p,), p)], 1)
    return x, (a + b).reshape(-1) % p


_CACHE: dict = {}


def model(
    p: int = 23,
    d: int = 32,
    heads: int = 2,
    d_mlp: int = 64,
    steps: int = 1500,
    lr: float = 1e-2,
    weight_decay: float = 1.0,
    probes: int = 64,
    seed: int = 0,
):
    """Train the transformer on all ``p²`` sums; return ``(net, (x, y), probes)``.

    Full-batch AdamW with weight decay (which makes the Fourier algorithm sparse: few key
    frequencies), then full-batch Adam without decay to polish ``w*`` to a minimum of the
    training loss. ``probes`` is a dict: ``"probes"`` (a fixed random subset of the sums,
    used by the constraint) and ``"all"`` (every sum, for the MI estimates). The trained
    network is cached per argument set within the process.
    """
    key = (p, d, heads, d_mlp, steps, lr, weight_decay, probes, seed)
    if key in _CACHE:
        return _CACHE[key]
    torch.manual_seed(seed)
    x, y = modular_addition(p)
    net = ModAdd(p, d, heads, d_mlp)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(steps):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        opt = torch.optim.Adam(net.parameters(), lr=lr / 10)
        for t in range(steps // 3):
            for group in opt.param_groups:
                group["lr"] = lr / 10 * (1 - t / (steps // 3))
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(prev)
    net.eval()
    g = torch.Generator().manual_seed(seed + 1)
    pick = torch.randperm(x.shape[0], generator=g)[:probes]
    out = (net, (x, y), {"probes": x[pick], "all": x})
    _CACHE[key] = out
    return out


# ---------------------------------------------------------------------------- observables
def _draw_subset(ref, max_draws: int) -> np.ndarray:
    W = np.asarray(ref.flat()).reshape(-1, ref.d)
    if W.shape[0] > max_draws:
        W = W[np.linspace(0, W.shape[0] - 1, max_draws).round().astype(int)]
    return W


def _per_chain_se(v: np.ndarray, chains: int) -> float:
    """Standard error of the mean from the spread of the chains' means (≥ 2 chains)."""
    v = np.asarray(v, dtype=float)
    if chains < 2 or v.size < chains:
        return float(v.std(ddof=1) / math.sqrt(max(v.size, 1))) if v.size > 1 else float("nan")
    m = np.array([c.mean() for c in np.array_split(v, chains)])
    return float(m.std(ddof=1) / math.sqrt(chains))


def accuracy(ref, max_draws: int = 64):
    """Accuracy on all ``p²`` sums, averaged over draws; stderr from the chains' means."""
    post = ref.posterior
    pred = ref.predict(post.x, max_draws=max_draws)  # [S, n, p]
    acc = (pred.argmax(-1) == post.y).double().mean(-1).cpu().numpy()
    return float(acc.mean()), _per_chain_se(acc, ref.chains)


def _embed_power(E: np.ndarray, p: int) -> np.ndarray:
    """Fourier power of the token embedding ``E [p, d]`` per frequency ``k = 1..(p−1)/2``."""
    F_ = np.fft.rfft(E - E.mean(0), axis=0)  # [p//2 + 1, d]
    return (np.abs(F_[1 : (p - 1) // 2 + 1]) ** 2).sum(1)


def key_frequencies(net, share: float = 0.8) -> list[int]:
    """The fewest frequencies holding ``share`` of the embedding's Fourier power at ``w*``."""
    p = net.p
    pw = _embed_power(net.embed.weight.detach().double().cpu().numpy()[:p], p)
    order = np.argsort(pw)[::-1]
    cum = np.cumsum(pw[order]) / pw.sum()
    kk = order[: int(np.searchsorted(cum, share)) + 1] + 1
    return sorted(int(k) for k in kk)


def _embed_matrices(ref, max_draws: int) -> tuple[np.ndarray, int]:
    post = ref.posterior
    net = post.lifted.net
    W = _draw_subset(ref, max_draws)
    out = []
    for w in W:
        params = post.lifted.unflatten(torch.as_tensor(w, dtype=post.dtype))
        E = params.get("embed.weight")
        if E is None:  # the embedding is not lifted: every draw keeps w*'s
            E = net.embed.weight
        out.append(E.detach().double().cpu().numpy()[: net.p])
    return np.stack(out), net.p


def embed_fourier(ref, max_draws: int = 64):
    """Share of the embedding's Fourier power (frequencies 1..(p−1)/2) at ``w*``'s key
    frequencies, averaged over draws (``w*``'s own share is about 0.8 by construction)."""
    net = ref.posterior.lifted.net
    keys = np.array(key_frequencies(net)) - 1
    Es, p = _embed_matrices(ref, max_draws)
    share = np.array([_embed_power(E, p)[keys].sum() / _embed_power(E, p).sum() for E in Es])
    return float(share.mean()), _per_chain_se(share, ref.chains)


def keys_kept(ref, max_draws: int = 64, threshold: float = 0.5):
    """Number of ``w*``'s key frequencies whose embedding power at a draw is at least
    ``threshold`` times its power at ``w*``, averaged over draws."""
    net = ref.posterior.lifted.net
    p = net.p
    keys = np.array(key_frequencies(net)) - 1
    p0 = _embed_power(net.embed.weight.detach().double().cpu().numpy()[:p], p)[keys]
    Es, _ = _embed_matrices(ref, max_draws)
    kept = np.array([(_embed_power(E, p)[keys] >= threshold * p0).sum() for E in Es], float)
    return float(kept.mean()), _per_chain_se(kept, ref.chains)


def neuron_fourier(ref, max_draws: int = 32):
    """Share of the neurons' (``mlp.1``) Fourier power over the ``(a, b)`` grid that lies
    on the key-frequency components ``(k_a, k_b)`` with ``k_a, k_b ∈ {0} ∪ keys`` (DC
    excluded), averaged over draws."""
    post = ref.posterior
    net = post.lifted.net
    p = net.p
    keys = key_frequencies(net)
    acts = ref.activations(post.x, "mlp.1", max_draws=max_draws)  # [S, p², d_mlp]
    A = acts.double().cpu().numpy().reshape(acts.shape[0], p, p, -1)
    A = A - A.mean((1, 2), keepdims=True)
    P = (np.abs(np.fft.fft2(A, axes=(1, 2))) ** 2).sum(-1)  # [S, p, p]
    sel = np.zeros((p, p), dtype=bool)
    ks = [0] + [k for k in keys] + [p - k for k in keys]
    for i in ks:
        for j in ks:
            sel[i, j] = True
    sel[0, 0] = False
    share = P[:, sel].sum(1) / P.reshape(P.shape[0], -1).sum(1)
    return float(share.mean()), _per_chain_se(share, ref.chains)
