"""Exact samplers for a constrained local posterior at d ≈ 4·10³ on CPU, side by side.

The network: the one-layer transformer of ``examples/llc_transformer.py`` trained on
(a + b) mod 23 (2 heads, d_model 32, d_mlp 64: about 10⁴ weights), its MLP lifted
(d = 4,192), γ = 100, nβ = n/log n, conditioned on the MLP output at 64 probe inputs
(an ``Activations`` constraint at a tolerance that binds). The samplers:

* MALA with the diagonal metric adapted in warmup (``metric="diagonal"``, the default);
* MALA with the identity metric (the anchor: an unpreconditioned exact sampler);
* NumPyro NUTS on the JAX export (diagonal mass matrix).

Each gets the same wall-clock budget class (fixed iterations); printed: wall time, the
bulk ESS of ``L_n`` and the smallest bulk ESS over 20 random coordinates, ESS per second,
and the ratios to identity-MALA. All chains start at ``w*``.

Usage: ``python benchmarks/exact_constrained.py [--quick] [--threads 1]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import condpost as cp  # noqa: E402
from condpost.diagnostics import ess_bulk  # noqa: E402


def build(seed: int = 0):
    from llc_transformer import Transformer, modular_addition, train

    torch.manual_seed(seed)
    x, y = modular_addition(23)
    net = Transformer(23, 32, 2, 64)
    loss, acc = train(net, x, y, steps=600, lr=5e-3, batch=128, seed=seed, polish=200, quiet=True)
    n_weights = sum(p.numel() for p in net.parameters())
    post = cp.LocalPosterior(
        net,
        (x, y),
        cp.Categorical(),
        localization=100.0,
        include="blocks.0.mlp",
        check_center=False,
    )
    probes = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))[:64]]
    post.preserve(cp.Activations("blocks.0.mlp", probes, tolerance=0.05))
    return post, n_weights, loss, acc


def summarize(name, ref, wall, coords):
    L = np.asarray(ref.loss())
    W = np.asarray(ref.flat())[..., coords]
    e_loss = float(ess_bulk(L))
    e_min = min(float(ess_bulk(W[..., j])) for j in range(W.shape[-1]))
    return {"name": name, "wall": wall, "ess_loss": e_loss, "ess_min": e_min}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    post, nw, loss, acc = build()
    print(
        f"network: {nw} weights, lifted d = {post.d}, train loss {loss:.2e}, acc {acc:.3f}; "
        f"torch threads {args.threads}"
    )
    chains, warmup, draws = (4, 300, 300) if args.quick else (4, 1500, 1500)
    coords = np.random.default_rng(0).choice(post.d, 20, replace=False)
    rows = []
    for name, method, kw in [
        ("MALA identity (anchor)", "mala", {"metric": "identity"}),
        ("MALA diagonal", "mala", {"metric": "diagonal"}),
        ("NumPyro NUTS", "nuts", {"backend": "numpyro", "max_tree_depth": 8}),
    ]:
        t0 = time.perf_counter()
        ref = post.sample(
            method, chains=chains, warmup=warmup, draws=draws, seed=0, progress=False, **kw
        )
        wall = time.perf_counter() - t0
        r = summarize(name, ref, wall, coords)
        rows.append(r)
        print(ref.preservation(warn_user=False))
        print(
            f"{name:24s} wall {wall:8.1f} s  ESS(L_n) {r['ess_loss']:8.1f}  min ESS(coords) "
            f"{r['ess_min']:8.1f}  ESS(L_n)/s {r['ess_loss'] / wall:7.3f}",
            flush=True,
        )
    base = rows[0]
    for r in rows[1:]:
        print(
            f"ratio {r['name']} / {base['name']}: ESS(L_n)/s "
            f"{(r['ess_loss'] / r['wall']) / (base['ess_loss'] / base['wall']):.2f}×, "
            f"min-coordinate ESS/s {(r['ess_min'] / r['wall']) / (base['ess_min'] / base['wall']):.2f}×"
        )


if __name__ == "__main__":
    main()
