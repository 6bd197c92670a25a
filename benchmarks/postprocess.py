"""Post-processing cost after ChEES and NumPyro NUTS at 64 chains, before and after.

Before: every draw re-evaluated in torch (L_n, defects, the virial term with a gradient)
— what ``ReferenceClass.from_draws`` still does, and what every executor did before the
driver. After: ``ReferenceClass.from_result`` with the L_n and virial the executor
measured in JAX. Both are timed on the same draws in one run and printed as a fraction
of the sampling time (the target: after ≤ 5%).

    python benchmarks/postprocess.py [--draws 200] [--warmup 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import condpost as cp
from condpost.infer import registry
from condpost.reference import ReferenceClass
from condpost.run import sample


def make_post(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(200, 2, generator=g) * 4 - 2
    y = torch.sin(1.5 * x[:, :1]) * torch.cos(x[:, 1:]) + 0.1 * torch.randn(200, 1, generator=g)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(1500):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    return cp.LocalPosterior(
        net.eval(), (x, y), cp.Gaussian(scale=0.1), localization=10.0, check_center=False
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--chains", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    post = make_post()
    print(f"MLP 2-16-1, d={post.d}, n={post.n}, {args.chains} chains, torch threads {args.threads}")
    for method in ("chees", "nuts"):
        kw = dict(chains=args.chains, warmup=args.warmup, draws=args.draws, progress=False)
        sample(post, method, **kw)  # compile once; the timed run reuses the programs
        t0 = time.perf_counter()
        res = sample(post, method, seed=1, **kw)
        t_sample = time.perf_counter() - t0
        t0 = time.perf_counter()
        old = ReferenceClass.from_draws(
            post, torch.as_tensor(res.draws), settings=dict(res.settings)
        )
        t_before = time.perf_counter() - t0
        t0 = time.perf_counter()
        new = ReferenceClass.from_result(post, res)
        t_after = time.perf_counter() - t0
        # the JAX-measured statistics against torch's re-evaluation of the same draws
        dl = np.abs(new.loss() - old.loss()).max() / np.abs(old.loss()).max()
        dv = np.abs(new.stat("virial") - old.stat("virial")).max() / post.d
        print(
            f"{method:6s} ({registry.get(method).default}): sampling {t_sample:.2f}s; "
            f"post-processing before {t_before:.2f}s = {t_before / t_sample:.1%} of sampling, "
            f"after {t_after:.3f}s = {t_after / t_sample:.1%}  (ratio before/after "
            f"{t_before / max(t_after, 1e-9):.0f}x)\n        JAX vs torch on the same draws: "
            f"max relative L_n difference {dl:.1e}, max virial difference / d {dv:.1e}"
        )


if __name__ == "__main__":
    main()
