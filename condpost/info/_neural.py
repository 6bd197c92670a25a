"""Neural variational MI estimators (torch): InfoNCE and SMILE.

* InfoNCE (van den Oord et al. 2018; Poole et al. 2019, ICML): for a batch of ``B`` pairs
  and critic scores ``S_ij = f(x_i, y_j)``,
  ``Î = (1/B) Σ_i [S_ii − log Σ_j exp S_ij] + log B  ≤ log B``.
  It is a lower bound on ``I(X;Y)`` that saturates at ``log B``.
* SMILE (Song & Ermon 2020, ICLR): the Donsker–Varadhan form with clipped ratios,
  ``Î = (1/B) Σ_i S_ii − log mean_{i≠j} exp(clip(S_ij, −τ, τ))``; the clip ``τ`` trades
  variance for bias and removes the ``log B`` ceiling.

The critic is separable, ``f(x, y) = g(x)ᵀ h(y)``, with two small MLPs, trained with Adam
on 70% of the pairs: on the InfoNCE objective for InfoNCE, and on the Jensen–Shannon
objective (whose optimum is the log density ratio itself) for SMILE, as Song & Ermon
recommend. Training stops early at the best bound on a 15% validation split; the value is
the bound on held-out batches of the last 15% (test split), and its standard error is the
spread of those batch values divided by √(batches).
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


def _js(s: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon (f-GAN) critic objective; its optimum is ``log p(x,y)/(p(x)p(y))``."""
    b = s.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=s.device)
    sp = torch.nn.functional.softplus
    return -sp(-torch.diagonal(s)).mean() - sp(s[off]).mean()


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
    holdout: float = 0.3,
    eval_every: int = 50,
    progress: bool = False,
):
    """Train a separable critic and evaluate InfoNCE or SMILE on held-out pairs.

    Returns ``(value, stderr, settings, details, notes)``.
    """
    from ._common import InfoWarning, _resolve_stderr

    if kind not in ("infonce", "smile"):
        raise ValueError(f"kind must be 'infonce' or 'smile'; got {kind!r}")
    n = x.shape[0]
    n_test = int(round(holdout * n))
    batch_size = int(min(batch_size, n - n_test, max(n_test // 2, 2)))
    if batch_size < 2 or n_test < 32:
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
    n_val = n_test // 2
    valid, test, train = perm[:n_val], perm[n_val:n_test], perm[n_test:]
    opt = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=lr)
    from tqdm.auto import tqdm

    def bound(s):
        return _infonce(s) if kind == "infonce" else _smile(s, clip)

    def evaluate(idx_all):
        out, clipped = [], []
        with torch.no_grad():
            for b in range(max(1, idx_all.numel() // batch_size)):
                idx = idx_all[b * batch_size : (b + 1) * batch_size]
                s = _scores(g, h, xt[idx], yt[idx])
                out.append(float(bound(s)))
                clipped.append(float((torch.diagonal(s).abs() > clip).float().mean()))
        return out, clipped

    # early stopping: keep the critic with the best bound on the validation split; the
    # reported value comes from a separate test split, so the selection does not bias it
    best, best_state, best_step = -float("inf"), None, 0
    it = tqdm(range(int(steps)), desc=f"{kind} critic", disable=not progress, leave=False)
    for step in it:
        idx = train[torch.randint(0, train.numel(), (batch_size,), generator=gen).to(dev)]
        s = _scores(g, h, xt[idx], yt[idx])
        obj = _infonce(s) if kind == "infonce" else _js(s)
        opt.zero_grad(set_to_none=True)
        (-obj).backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == int(steps):
            v = float(np.mean(evaluate(valid)[0]))
            if v > best:
                best, best_step = v, step + 1
                best_state = [
                    {k: t.detach().clone() for k, t in m.state_dict().items()} for m in (g, h)
                ]
    if best_state is not None:
        g.load_state_dict(best_state[0])
        h.load_state_dict(best_state[1])
    vals, clipped = evaluate(test)
    val = float(np.mean(vals))
    se = float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
    if se_method == "none":
        se = float("nan")
    notes: list[str] = []
    log_b = math.log(batch_size)
    details = {"batch_values": vals, "log_batch": log_b, "best_step": best_step}
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
        "training": "infonce" if kind == "infonce" else "jensen-shannon",
        "selection": f"early stopping on a validation split (every {eval_every} steps)",
        "stderr": "heldout batches" if se_method != "none" else "none",
        **({"clip": clip} if kind == "smile" else {}),
        "standardize": True,
    }
    return val, se, settings, details, notes
