"""The README demo: ``python -m condpost.demo``.

Trains a small MLP regressor on generated data (no download), declares a
preserved-activation constraint on its hidden layer, samples the conditioned local
posterior with NUTS, and prints the diagnostics, the LLC and how well the
constraint holds. Runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import time

import torch

import condpost as cp


def make_data(n: int = 200, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy samples of ``y = sin(1.5 x₁)·cos(x₂)`` on [−2, 2]², noise sd 0.1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 4 - 2
    y = torch.sin(1.5 * x[:, :1]) * torch.cos(x[:, 1:]) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def train(x: torch.Tensor, y: torch.Tensor, hidden: int = 6, seed: int = 0) -> torch.nn.Module:
    """Adam, then full-batch L-BFGS to a minimum of the mean squared error (one torch
    thread: for a network this small, more threads only wait for each other)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, y, hidden, seed)
    finally:
        torch.set_num_threads(prev)


def _train(x, y, hidden, seed):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(2000):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    lbfgs = torch.optim.LBFGS(
        net.parameters(),
        max_iter=1000,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure():
        lbfgs.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        return loss

    lbfgs.step(closure)
    return net.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--draws", type=int, default=500)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    x, y = make_data()
    net = train(x, y)
    with torch.no_grad():
        rmse = ((net(x) - y) ** 2).mean().sqrt()
    d = sum(p.numel() for p in net.parameters())
    print(
        f"trained a 2-6-1 tanh MLP ({d} weights) on {len(x)} points: RMSE {rmse:.3f} "
        f"(noise 0.1), {time.perf_counter() - t0:.1f}s"
    )

    post = cp.LocalPosterior(
        net,
        data=(x, y),
        likelihood=cp.Gaussian(scale=0.1),
        localization=10.0,
        dtype=torch.float64,
    )
    probes = make_data(16, seed=1)[0]
    post.preserve(cp.Activations("1", probes, tolerance=0.05))  # hidden tanh layer
    print(post)
    ref = post.sample(
        "nuts",
        chains=args.chains,
        warmup=args.warmup,
        draws=args.draws,
        seed=0,
        progress=not args.quiet,
    )
    summary = ref.summary()
    print()
    print(summary)
    print()
    print(ref.llc())
    print()
    print("preservation of the hidden-layer activations:")
    report = ref.preservation()
    print(report)
    binding = report.rows[0]["binding"]
    print(
        "\nwhat success looks like:"
        f"\n  R-hat ≤ 1.01 and bulk ESS ≥ 400 for L_n: "
        f"{_ok(summary.rows[0]['r_hat'] <= 1.01 and summary.rows[0]['ess_bulk'] >= 400)} "
        f"(R-hat {summary.rows[0]['r_hat']:.3f}, ESS {summary.rows[0]['ess_bulk']:.0f})"
        f"\n  virial ratio E[(w−w*)·∇U]/d near 1 (the draws are in equilibrium): "
        f"{_ok(abs(summary.virial_ratio - 1) <= max(0.05, 3 * summary.virial_stderr))} "
        f"({summary.virial_ratio:.3f} ± {summary.virial_stderr:.3f})"
        f"\n  binding between 0.05 and 0.95 (the constraint shapes the posterior without "
        f"freezing it): {_ok(0.05 <= binding <= 0.95)} ({binding:.3f})"
        f"\n  no warnings above: {_ok(not summary.warnings and not report.warnings)}"
    )
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    main()
