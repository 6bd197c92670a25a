"""Information flow through a small network, as curves over the precision scale nβ.

A two-layer tanh network is trained on generated regression data. Its reference class
is the tempered local posterior around the trained weights w*, either unconstrained or
conditioned on preserving the circuit from the hidden layer to the output
(``CircuitMap``, activation patching). For each nβ we sample both and measure the
mutual information between the hidden layer A (site ``"1"``) and the output B (site
``""``) with all three ensemble targets of docs/theory.md §3.4.5:

* observational ``I(A;B)`` under (X, W);
* channel ``I(A'; C_W(A'))`` with A' drawn independently of the weights W that run the
  circuit A → B;
* input ``I(X;B)`` over a finite set of m probes (≤ log m).

For one fixed network each of these is infinite or trivial; across the reference class
it is finite, and it grows as the class shrinks (larger nβ). The script prints a table
per curve with the slope dI/d log nβ and saves a three-panel plot.

Run::

    python examples/information_flow.py            # all weights lifted; NUTS, dense mass:
                                                   # ~6 min per nβ setting on a busy 2-core box
    python examples/information_flow.py --quick    # CI smoke run, < 40 s; too few draws
                                                   # for the numbers to mean much
    python examples/information_flow.py --out flow.png
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import condpost as cp
from condpost import info
from condpost.sweep import sweep


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.tanh(2.0 * x[:, :1]) - 0.5 * torch.tanh(2.0 * x[:, 1:])
    y = y + 0.1 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x, y


def train(x, y, hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    ).double()
    opt = torch.optim.LBFGS(net.parameters(), lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    return net.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CI run (< 40 s)")
    ap.add_argument("--out", default="examples/information_flow.png", help="plot file")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(1)  # small network: one thread is fastest and fair to neighbours

    if args.quick:
        # CI smoke run: few draws, and only the readout layer is lifted (the weight-refined
        # setting, docs/theory.md C10), whose posterior is nearly Gaussian and cheap for NUTS
        n, hidden, nbetas, include = 128, 3, [10.0, 100.0], "2.*"
        run = dict(chains=1, warmup=60, draws=120, max_tree_depth=6)
        boot, m_obs = 10, 120
    else:
        n, hidden, nbetas, include = 256, 3, [3.0, 10.0, 30.0, 100.0], None
        run = dict(chains=2, warmup=300, draws=800, dense_mass=True)
        boot, m_obs = 50, 2000
    x, y = make_data(n, args.seed)
    net = train(x, y, hidden, args.seed)
    noise = 0.1
    g = torch.Generator().manual_seed(args.seed + 1)
    probes_obs = torch.randn(m_obs, 2, generator=g, dtype=torch.float64)  # X ~ N(0, I)
    probes_in = torch.randn(8, 2, generator=g, dtype=torch.float64)  # m = 8: I(X;B) ≤ log 8
    a, b = "1", ""  # hidden activations (after tanh) and the output

    def post_for(conditioned: bool):
        post = cp.LocalPosterior(
            net,
            (x, y),
            cp.Gaussian(scale=noise),
            localization=1.0,
            include=include,
            check_center=False,
        )
        if conditioned:
            post.preserve(
                cp.CircuitMap(
                    a, b, probes=x[:64], interventions="resample", tolerance=0.02, name="circuit"
                )
            )
        return post

    common = dict(bootstrap=boot, progress=False)
    # KSG (k = 10) for the continuous targets: two of the three hidden units learn almost
    # the same feature (a redundant unit, typical of singular models), and rank-based
    # estimators see tied ranks there
    observables = {
        "observational": lambda ref: info.mutual_information(
            ref, probes=probes_obs, a=a, b=b, target="observational", estimator="ksg", **common
        ),
        "channel": lambda ref: info.mutual_information(
            ref, probes=probes_obs, a=a, b=b, target="channel", estimator="ksg", **common
        ),
        "input": lambda ref: info.mutual_information(
            ref, probes=probes_in, b=b, target="input", **common
        ),
    }
    results = {}
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    for label, cond in (("unconstrained", False), ("conditioned", True)):
        t1 = time.perf_counter()
        post = post_for(cond)
        res = sweep(
            post,
            nbeta=nbetas,
            observables=observables,
            seed=args.seed,
            progress=not args.quick,
            num_threads=1,
            **run,
        )
        results[label] = res
        print(
            f"\n{label} (d = {post.d}, γ = {post.localization:g}; {time.perf_counter() - t1:.1f} s):"
        )
        print(res.table())
        for name in observables:
            print("  ", res.slope(name))
    print(f"\n(log 8 = {math.log(8):.3f} bounds the input target)")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    else:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharex=True)
        titles = {
            "observational": "observational I(A;B)",
            "channel": "channel I(A'; C_W(A'))",
            "input": "input I(X;B), m = 8",
        }
        for ax, name in zip(axes, observables, strict=True):
            for label, res in results.items():
                res.plot(ax=ax, names=[name], label=label)
            ax.set_title(titles[name])
            ax.set_ylabel("nats")
        axes[2].axhline(math.log(8), color="grey", ls=":", lw=1)
        fig.suptitle("hidden layer → output, across the reference class")
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"saved {args.out}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return results


if __name__ == "__main__":
    main()
