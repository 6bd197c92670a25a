"""Neural variational MI estimators (torch): InfoNCE and SMILE.

* InfoNCE (van den Oord et al. 2018; Poole et al. 2019, ICML): for a batch of ``B`` pairs
  and critic scores ``S_ij = f(x_i, y_j)``,
  ``Î = (1/B) Σ_i [S_ii − log Σ_j exp S_ij] + log B  ≤ log B``.
  It is a lower bound on ``I(X;Y)`` that saturates at ``log B``.
* SMILE (Song & Ermon 2020, ICLR): the Donsker–Varadhan form with clipped ratios,
  ``Î = (1/B) Σ_i S_ii − log mean_{i≠j} exp(clip(S_ij, −τ, τ))``; the clip ``τ`` trades
  variance for bias and removes the ``log B`` ceiling.

The critic is separable, ``f(x, y) = g(x)ᵀ h(y)``, with two small MLPs; it is trained on
80% of the pairs (Adam) and the bound is evaluated on held-out batches of the other 20%.
The standard error is the spread of the held-out batch values divided by √(batches).
High MI lower bounds are provably hard to certify from samples (McAllester & Stratos
2020, AISTATS): a value near ``log B`` only says "at least this much".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .._errors import warn

__all__ = ["neural_mi"]


def _mlp(d_in: int, hidden: int, d_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, d_out),
    )


def _scores(g, h, xb, yb):
    return g(xb) @ h(yb).T


def _infonce(s: torch.Tensor) -> torch.Tensor:
    b = s.shape[0]
    return (torch.diagonal(s) - torch.logsumexp(s, dim=1)).mean() + math.log(b)


def _smile(s: torch.Tensor, clip: float) -> torch.Tensor:
    b = s.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    sc = torch.clamp(s[off], -clip, clip)
    return torch.diagonal(s).mean() - (torch.logsumexp(sc, 0) - math.log(sc.numel()))


def neural_mi(
    x: np.ndarray,
    y: np.ndarray,
    *,
    kind: str = "infonce",
    stderr: str | None = "auto",
    seed: int = 0,
    device=None,
    batch_size: int = 256,
    steps: int = 1500,
    lr: float = 1e-3,
    hidden: int = 128,
    embed: int = 32,
    clip: float = 5.0,
    holdout: float = 0.2,
    progress: bool = False,
):
    """Train a separable critic and evaluate InfoNCE or SMILE on held-out pairs.

    Returns ``(value, stderr, settings, details, notes)``.
    """
    from .estimators import InfoWarning, _resolve_stderr

    if kind not in ("infonce", "smile"):
        raise ValueError(f"kind must be 'infonce' or 'smile'; got {kind!r}")
    n = x.shape[0]
    n_test = int(round(holdout * n))
    batch_size = int(min(batch_size, n - n_test, max(n_test, 2)))
    if batch_size < 2 or n_test < 16:
        raise ValueError(
            f"the neural estimators need at least ~100 samples (got N = {n}); use "
            "estimator='copula_ksg' or 'gaussian' for small samples"
        )
    se_method = _resolve_stderr(stderr, "heldout", ("heldout",), kind)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        g = _mlp(x.shape[1], hidden, embed).to(dev, torch.float32)
        h = _mlp(y.shape[1], hidden, embed).to(dev, torch.float32)
    finally:
        torch.random.set_rng_state(torch_state)
    xt = torch.as_tensor(x, dtype=torch.float32, device=dev)
    yt = torch.as_tensor(y, dtype=torch.float32, device=dev)
    perm = torch.randperm(n, generator=gen).to(dev)
    test, train = perm[:n_test], perm[n_test:]
    opt = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=lr)
    from tqdm.auto import tqdm

    it = tqdm(range(int(steps)), desc=f"{kind} critic", disable=not progress, leave=False)
    for _ in it:
        idx = train[torch.randint(0, train.numel(), (batch_size,), generator=gen).to(dev)]
        s = _scores(g, h, xt[idx], yt[idx])
        obj = _infonce(s) if kind == "infonce" else _smile(s, clip)
        opt.zero_grad(set_to_none=True)
        (-obj).backward()
        opt.step()
    vals, clipped = [], []
    with torch.no_grad():
        nb = max(1, n_test // batch_size)
        for b in range(nb):
            idx = test[b * batch_size : (b + 1) * batch_size]
            s = _scores(g, h, xt[idx], yt[idx])
            vals.append(float(_infonce(s) if kind == "infonce" else _smile(s, clip)))
            clipped.append(float((torch.diagonal(s).abs() > clip).float().mean()))
    val = float(np.mean(vals))
    se = float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    if se_method == "none":
        se = float("nan")
    notes: list[str] = []
    log_b = math.log(batch_size)
    details = {"batch_values": vals, "log_batch": log_b}
    if kind == "infonce" and val > log_b - 1.0:
        msg = (
            f"InfoNCE estimate {val:.3f} nats is within 1 nat of its ceiling log(batch) = "
            f"{log_b:.3f}: it is saturated and only a lower bound; raise batch_size or use "
            "estimator='smile' or 'copula_ksg'"
        )
        notes.append(msg)
        warn(msg, InfoWarning)
    if kind == "smile" and float(np.mean(clipped)) > 0.1:
        msg = (
            f"{np.mean(clipped):.0%} of the held-out critic scores exceed the clip τ = {clip}: "
            "the SMILE estimate is biased low at this MI; raise clip"
        )
        notes.append(msg)
        warn(msg, InfoWarning)
    settings = {
        "kind": kind,
        "critic": "separable MLP g(x)·h(y)",
        "hidden": hidden,
        "embed": embed,
        "batch_size": batch_size,
        "steps": int(steps),
        "lr": lr,
        "holdout": holdout,
        "stderr": "heldout batches" if se_method != "none" else "none",
        **({"clip": clip} if kind == "smile" else {}),
        "standardize": True,
    }
    return val, se, settings, details, notes
