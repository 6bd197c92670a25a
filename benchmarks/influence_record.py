"""Cost of recording per-sample losses along SG-MCMC chains (issue 15 acceptance).

Target: recording ``ℓ_i(w)`` for a 10⁴-sample query set costs ≤ 1.5× the sampling time
at 16 chains on CPU, and memory stays bounded when the recording is streamed to a store.

The network is an MLP classifier 32→64→64→10 (6,922 weights... see ``--hidden``) trained
briefly on n = 10⁴ synthetic samples; the query set is the whole training set. The same
SGLD run (16 chains, batch 256, ``thin`` steps between kept draws) is timed without and
with ``record_losses=True`` (every kept draw), interleaved ``--repeats`` times; medians
and their ratio are printed. Then the recording is streamed to a run store at two run
lengths, each in a fresh process, and the peak resident memory (``ru_maxrss``) of the
two is compared: it must not grow with the number of draws recorded.

    python benchmarks/influence_record.py                 # 16 chains, q = 10⁴
    python benchmarks/influence_record.py --repeats 1 --draws 50

Say which thread count you used (``--threads``, default 1): torch on two busy cores can
be several times slower with two threads than with one.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import condpost as cp


def build(n: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 32, generator=g)
    teacher = torch.randn(32, 10, generator=g)
    y = (X @ teacher + 0.5 * torch.randn(n, 10, generator=g)).argmax(-1)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(32, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.GELU(),
        torch.nn.Linear(hidden, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(300):
        idx = torch.randint(n, (512,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(X[idx]), y[idx]).backward()
        opt.step()
    post = cp.LocalPosterior(
        net, data=(X, y), likelihood=cp.Categorical(), localization=100.0, check_center=False
    )
    return post


def run(post, args, record: bool, store=None, draws=None):
    kw = dict(
        chains=args.chains,
        warmup=args.warmup,
        draws=draws or args.draws,
        thin=args.thin,
        step_size=args.step,
        batch_size=256,
        seed=0,
        progress=False,
        keep_draws=False,
    )
    if record:
        kw.update(record_losses=True, record_every=args.every)
    if store is not None:
        kw.update(store=store)
    t0 = time.perf_counter()
    ref = post.sample("sgld", **kw)
    return time.perf_counter() - t0, ref


def child(args) -> None:
    """One streamed, recorded run; prints its peak RSS (MB) as JSON."""
    torch.set_num_threads(args.threads)
    post = build(args.n, args.hidden)
    with tempfile.TemporaryDirectory() as tmp:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        wall, ref = run(post, args, True, store=Path(tmp) / "s.cpst", draws=args.child_draws)
        rec = ref.records["losses"]
        print(
            json.dumps(
                {
                    "draws": args.child_draws,
                    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "before_run_mb": base,
                    "recorded_mb": rec.size * rec.itemsize / 2**20,
                    "wall_s": wall,
                }
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--thin", type=int, default=100)
    ap.add_argument("--every", type=int, default=1)
    ap.add_argument("--step", type=float, default=1e-5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child-draws", type=int, default=0)
    args = ap.parse_args()
    if args.child_draws:
        return child(args)
    torch.set_num_threads(args.threads)
    post = build(args.n, args.hidden)
    print(
        f"MLP 32→{args.hidden}→{args.hidden}→10, d = {post.d:,}, n = q = {args.n:,}; SGLD "
        f"{args.chains} chains × ({args.warmup} + {args.draws}·{args.thin}) steps, batch 256; "
        f"losses recorded with record_every={args.every}; {args.threads} thread(s)"
    )
    run(post, args, True, draws=2)  # warm up both paths
    plain, rec = [], []
    for _ in range(args.repeats):
        plain.append(run(post, args, False)[0])
        rec.append(run(post, args, True)[0])
    p, r = statistics.median(plain), statistics.median(rec)
    print(f"{'sampling only':28s} {p:8.2f} s")
    print(f"{'sampling + recording':28s} {r:8.2f} s   ratio {r / p:.2f}× (target ≤ 1.5×)")
    rows = []
    for dr in (args.draws, 4 * args.draws):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--child-draws", str(dr)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for row in rows:
        print(
            f"streamed to a store, {row['draws']:5d} draws: recorded {row['recorded_mb']:8.1f} MB"
            f" on disk, peak RSS {row['peak_mb']:7.1f} MB"
        )
    print(f"peak RSS ratio (4× the draws): {rows[1]['peak_mb'] / rows[0]['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
