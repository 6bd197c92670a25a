"""Resident memory of a streamed SG-MCMC run (issue 5 acceptance: < 1 GB).

Samples an MLP 64→256→256→64 (98,880 parameters) with SGLD, streaming every draw to a
run store on disk (``store=...``), and reports the peak resident set size of the
process (``ru_maxrss``) and RSS sampled during the run, next to the size of the draws
written. Holding the same draws in memory would take ``chains × draws × d × 4`` bytes.

    python benchmarks/sgmcmc_memory.py                # 4 chains × 2,500 draws = 10⁴ draws
    python benchmarks/sgmcmc_memory.py --draws 250    # quick check

The store (≈ 4 GB for the default run) is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

import condpost as cp


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--draws", type=int, default=2500)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--store", type=str, default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    h = args.hidden
    net = torch.nn.Sequential(
        torch.nn.Linear(64, h),
        torch.nn.Tanh(),
        torch.nn.Linear(h, h),
        torch.nn.Tanh(),
        torch.nn.Linear(h, 64),
    )
    X = torch.randn(args.n, 64)
    with torch.no_grad():
        Y = net(X) + 0.1 * torch.randn(args.n, 64)
    post = cp.LocalPosterior(
        net, (X, Y), cp.Gaussian(scale=0.1), localization=100.0, check_center=False
    )
    d = post.d
    tmp = None
    if args.store is None:
        tmp = tempfile.mkdtemp(prefix="cpst_")
        store = Path(tmp) / "run.cpst"
    else:
        store = Path(args.store)
    rss0 = rss_mb()
    samples = []

    def cb(state, draw):
        if draw % 50 == 0:
            samples.append(rss_mb())

    t0 = time.perf_counter()
    ref = post.sample(
        "sgld",
        chains=args.chains,
        warmup=args.warmup,
        draws=args.draws,
        step_size=1e-7,
        batch_size=args.batch_size,
        store=store,
        callback=cb,
        progress=True,
        seed=0,
    )
    wall = time.perf_counter() - t0
    lam = ref.llc(warn_user=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    on_disk = os.path.getsize(store / "draws.bin") / 2**30
    in_mem = args.chains * args.draws * d * 4 / 2**30
    print(
        f"network: d = {d:,} parameters; {args.chains} chains × {args.draws} draws "
        f"= {args.chains * args.draws:,} draws; wall {wall:.0f} s"
    )
    print(f"draws written to disk: {on_disk:.2f} GiB (in memory they would take {in_mem:.2f} GiB)")
    print(
        f"RSS before sampling {rss0:.0f} MiB; during sampling max {max(samples):.0f} MiB, "
        f"last {samples[-1]:.0f} MiB; peak RSS of the process (ru_maxrss) {peak:.0f} MiB"
    )
    print(f"λ̂ = {lam.mean:.4g} ± {lam.stderr:.2g}  (reading the memory-mapped store)")
    print("PASS" if peak < 1024 else "FAIL", "(< 1 GB resident)")
    del ref
    if tmp is not None and not args.keep:
        shutil.rmtree(tmp)
    assert math.isfinite(lam.mean)


if __name__ == "__main__":
    main()
