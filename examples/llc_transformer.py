"""LLC of a small transformer and the weight-refined LLC of each attention head (issue 5).

1. Generate the data: every pair ``(a, b)`` of residues mod ``p`` as the sequence
   ``[a, b, =]``, labelled ``(a + b) mod p`` (no download).
2. Train a one-layer pre-LayerNorm transformer (default 106,485 parameters;
   ``--quick``: 10,103) with AdamW
   on the full dataset, then polish ``w*`` with a few full-batch gradient steps.
3. Estimate with vectorized SGLD chains (``LocalPosterior.sample("sgld", chains=8)``):

   * the LLC of the whole network, ``λ̂ = nβ(E[L_n] − L_n(w*))`` (docs/theory.md §3.1.1);
   * the **weight-refined LLC** of each attention head ``h`` (Wang et al. 2024,
     "Differentiation and specialization of attention heads via the refined local
     learning coefficient"; docs/theory.md §3.1.4): the same estimator with only that head's
     parameters lifted (``include="blocks.0.attn.heads.<h>.*"``), all other weights frozen
     at ``w*``.

Per-head parameters. The attention is written with one module per head
(``blocks.0.attn.heads.<h>`` with bias-free ``q, k, v: d_model → d_head`` and
``o: d_head → d_model``; the block's output is the sum of the heads' ``o`` outputs). This is
the same function as a fused ``qkv``/``out`` projection, but each head's weights are
separate parameters, so an ``include`` glob lifts exactly one head (its query, key, value
and its slice of the output projection).

nβ = n/log n and γ as printed. The step size is chosen with
``condpost.calibrate_step_size`` unless ``--step-size`` is given.

Usage::

    python examples/llc_transformer.py            # full size (CPU: several minutes)
    python examples/llc_transformer.py --quick    # CI: a smaller model, ≈ 30 s
    python examples/llc_transformer.py --quick --quiet
"""

from __future__ import annotations

import argparse
import math
import time
import warnings

import torch
from torch import nn
from torch.nn import functional as F

import condpost as cp

try:  # public name once exported by the package
    from condpost import calibrate_step_size
except ImportError:  # pragma: no cover
    from condpost.stepsize import calibrate_step_size


# ---------------------------------------------------------------------------- model
class Head(nn.Module):
    """One causal attention head with its own query, key, value and output maps."""

    def __init__(self, d_model: int, d_head: int) -> None:
        super().__init__()
        self.q = nn.Linear(d_model, d_head, bias=False)
        self.k = nn.Linear(d_model, d_head, bias=False)
        self.v = nn.Linear(d_model, d_head, bias=False)
        self.o = nn.Linear(d_head, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        att = self.q(x) @ self.k(x).transpose(-1, -2) / math.sqrt(self.q.out_features)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return self.o(att @ self.v(x))


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(Head(d_model, d_model // n_heads) for _ in range(n_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.heads[0](x)
        for h in self.heads[1:]:
            out = out + h(x)
        return out


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Token + position embedding, ``n_layers`` blocks, final LayerNorm, unembedding.

    Returns the logits at the last position (``[batch, p]``).
    """

    def __init__(self, p: int, d_model: int, n_heads: int, d_mlp: int, n_layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(p + 1, d_model)  # token p is "="
        self.pos = nn.Parameter(0.02 * torch.randn(3, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for b in self.blocks:
            x = b(x)
        return self.unembed(self.ln(x[..., -1, :]))


def modular_addition(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    x = torch.stack([a, b, torch.full_like(a, p)], 1)
    return x, (a + b) % p


def train(net, x, y, *, steps, lr, batch, seed, polish, quiet):
    """AdamW on minibatches, then ``polish`` full-batch Adam steps with a decaying rate."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    for t in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if not quiet and (t % max(1, steps // 5) == 0 or t == steps - 1):
            print(f"  train step {t:5d}  minibatch loss {loss.item():.4f}")
    opt = torch.optim.Adam(net.parameters(), lr=lr / 10)
    for t in range(polish):
        for group in opt.param_groups:
            group["lr"] = lr / 10 * (1 - t / polish)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = net(x)
        return float(F.cross_entropy(out, y)), float((out.argmax(-1) == y).float().mean())


# ---------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model and short chains (CI)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars or training log")
    ap.add_argument("--p", type=int, default=53, help="modulus (n = p² samples)")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=640)
    ap.add_argument("--train-steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=5e-3, help="peak AdamW learning rate")
    ap.add_argument("--chains", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=128, help="SGLD minibatch size")
    ap.add_argument("--localization", type=float, default=100.0)
    ap.add_argument("--step-size", type=float, default=None, help="default: calibrated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save", default=None, help="save the trained network and its claims here")
    args = ap.parse_args(argv)
    if args.quick:
        args.p, args.d_model, args.heads, args.d_mlp = 23, 32, 4, 64
        args.train_steps, args.lr = 600, 1e-2
        args.warmup, args.draws, args.batch_size = 40, 80, 64
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()

    x, y = modular_addition(args.p)
    net = Transformer(args.p, args.d_model, args.heads, args.d_mlp).to(args.device)
    x, y = x.to(args.device), y.to(args.device)
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"transformer: 1 layer, d_model={args.d_model}, {args.heads} heads (per-head modules), "
        f"d_mlp={args.d_mlp}, {n_params:,} parameters; data: (a + b) mod {args.p}, n = {len(y)}"
    )
    t = time.perf_counter()
    loss, acc = train(
        net,
        x,
        y,
        steps=args.train_steps,
        lr=args.lr,
        batch=256 if args.quick else 512,
        seed=args.seed,
        polish=50 if args.quick else 200,
        quiet=args.quiet,
    )
    print(f"trained in {time.perf_counter() - t:.1f} s: L_n(w*) = {loss:.6f}, accuracy {acc:.4f}")
    if args.save:
        config = dict(p=args.p, d_model=args.d_model, n_heads=args.heads, d_mlp=args.d_mlp)
        state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
        torch.save(dict(config=config, state_dict=state, loss=loss, accuracy=acc), args.save)

    post = cp.LocalPosterior(
        net, data=(x, y), likelihood=cp.Categorical(), localization=args.localization
    )
    print(f"nβ = n/log n = {post.nbeta:.1f}, γ = {args.localization:g}, d = {post.d:,}")

    step = args.step_size
    if step is None:
        t = time.perf_counter()
        cal = calibrate_step_size(
            post,
            "sgld",
            step_sizes=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
            chains=2,
            steps=40 if args.quick else 200,
            batch_size=args.batch_size,
            seed=args.seed,
            progress=progress,
            warn_user=False,
        )
        step = cal.recommended if cal.recommended is not None else 1e-5
        print(f"step size {step:g} (calibrated in {time.perf_counter() - t:.1f} s)")

    def run(p, label):
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = p.sample(
                "sgld",
                chains=args.chains,
                warmup=args.warmup,
                draws=args.draws,
                step_size=step,
                batch_size=args.batch_size,
                seed=args.seed,
                progress=progress,
                keep_draws=False,
            )
            llc = ref.llc()
        wall = time.perf_counter() - t
        steps = args.chains * (args.warmup + args.draws)
        notes = sorted({str(w.message).split(". ")[0] for w in caught})  # first sentences
        return dict(
            what=label,
            d=p.d,
            llc=llc.mean,
            se=llc.stderr,
            std=llc.std,
            wall=wall,
            cs=steps / wall,
            notes=notes,
        )

    rows = [run(post, "whole network")]
    for h in range(args.heads):
        sub = cp.LocalPosterior(
            net,
            data=(x, y),
            likelihood=cp.Categorical(),
            localization=args.localization,
            include=f"blocks.0.attn.heads.{h}.*",
            check_center=False,
        )
        rows.append(run(sub, f"head {h} (blocks.0.attn.heads.{h}.*)"))

    print(
        f"\nLLC with {args.chains} vectorized SGLD chains × ({args.warmup} warmup + "
        f"{args.draws} draws), ε = {step:g}, batch {args.batch_size}:\n"
    )
    hdr = f"{'lifted weights':<34} {'d':>8} {'λ̂':>9} {'± s.e.':>8} {'std/chains':>10} {'chain-steps/s':>13}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(
            f"{r['what']:<34} {r['d']:>8,} {r['llc']:>9.3f} {r['se']:>8.3f} {r['std']:>10.3f} "
            f"{r['cs']:>13,.0f}"
        )
    for r in rows:
        for note in r["notes"]:
            print(f"  {r['what'].split(' (')[0]}: {note}")
    print(f"\ntotal time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
