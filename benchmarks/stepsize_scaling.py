"""``calibrate_step_size`` from d = 6 to d ≈ 10⁵: the answer, its reasoning, and its cost.

    python benchmarks/stepsize_scaling.py [--sizes regular 1e4 1e5] [--steps 200]

* ``regular``: docs/theory.md §4.2's model (d = 6, exact E[λ̂] = 2.9794 at γ = 1). The
  recommended step is then checked with a long SGLD run: λ̂ must be within 3% of exact.
* ``1e4`` / ``1e5``: MLPs on (a + b) mod 23 with 9,335 and ~10⁵ weights, all lifted,
  γ = 100. Prints the table, the reasoning (with each rung's relaxation-sized length,
  issue 12), the curvatures h_max and h_min, the total number of steps and the wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

import condpost as cp
from condpost.stepsize import calibrate_step_size

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from analytic import linear_net, whitened_problem  # noqa: E402
from test_calibration_net import mod_mlp  # noqa: E402


def regular(args) -> None:
    prob = whitened_problem(gamma=1.0, seed=4)
    post = cp.LocalPosterior(
        linear_net(prob), (prob.X, prob.Y), cp.Gaussian(scale=prob.s), localization=1.0
    )
    t = time.perf_counter()
    cal = calibrate_step_size(
        post,
        "sgld",
        chains=48,
        steps=800,
        batch_size=100,
        seed=1,
        progress=False,
        accept_proxy=False,
    )
    print(cal)
    print(f"calibration {time.perf_counter() - t:.1f} s")
    ref = post.sample(
        "sgld",
        chains=64,
        warmup=2000,
        draws=2000,
        thin=4,
        step_size=cal.recommended,
        batch_size=100,
        seed=7,
        progress=False,
    )
    lam = ref.llc(warn_user=False)
    exact = prob.expected_nbeta_dL()
    print(
        f"λ̂ at ε = {cal.recommended:.3g}: {lam.mean:.4f} ± {lam.stderr:.4f}; exact "
        f"{exact:.4f} ({100 * (lam.mean / exact - 1):+.2f}%), d/2 = 3"
    )


def network(args, h1, h2) -> None:
    net, x, y = mod_mlp(h1=h1, h2=h2)
    post = cp.LocalPosterior(net, (x, y), cp.Categorical(), localization=100.0, check_center=False)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cp.SamplerWarning)
        cal = calibrate_step_size(
            post,
            "sgld",
            chains=args.chains,
            steps=args.steps,
            rungs=args.rungs,
            batch_size=128,
            progress=False,
        )
    print(f"d = {post.d:,}")
    print(cal)
    st = cal.settings
    print(
        f"calibration {time.perf_counter() - t:.1f} s; h_max {st['h_max']:.4g}, h_min "
        f"{st['h_min']:.4g}, {st['total_steps']:,} steps in all ({st['chains']} chains), "
        f"recommended {cal.recommended:.3g} ({'qualified' if cal.qualified else 'fallback'})"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["regular", "1e4"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--rungs", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for s in args.sizes:
        print(f"\n=== {s} ===")
        if s == "regular":
            regular(args)
        elif s == "1e4":
            network(args, 96, 40)
        elif s == "1e5":
            network(args, 512, 128)
        else:
            raise SystemExit(f"unknown size {s!r}")


if __name__ == "__main__":
    main()
