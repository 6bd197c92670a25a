"""condpost's 1-chain SGLD against a hand-written PyTorch SGLD loop (issue 5, per-chain overhead).

Target: ``post.sample("sgld", chains=1, ...)`` takes ≤ 1.15× the time per step of the plain
loop ``benchmarks/_dln.py::plain_sgld`` (the update ``Δw = −ε/2 [nβ ∇L_B(w) + γ(w − w*)] +
√ε ξ`` written by hand: minibatch gradient, localizer, noise; nothing else).

condpost does more per step than that loop: it measures the loss of every kept draw
(docs/theory.md §5.3), checks for divergence and keeps the draws, the virial and ‖w − w*‖². The
table therefore lists the settings separately:

* ``loss="independent"``: each draw's loss on a fresh batch paired with ``w*`` (an extra
  forward pass at ``w`` and at ``w*`` per kept draw);
* ``loss="gradient"``: the draw's loss on the batch its gradient step uses anyway (the
  forward pass is shared with the gradient, only ``w*`` on that batch is extra);
* ``loss="gradient", thin=10``: one kept draw every 10 steps (equal gradient work).

The timed samplers run interleaved (plain, condpost settings, plain, ...) in one process
``--repeats`` times and the medians are compared, because absolute times on a shared
machine move by 2× between runs.

Usage::

    python benchmarks/sgld_overhead.py                      # DLN [5,4,3,4], n = 10⁴, batch 500
    python benchmarks/sgld_overhead.py --repeats 9 --steps 2000
    python benchmarks/sgld_overhead.py --profile gradient   # cProfile of one condpost run
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from _dln import make_data, make_dln, make_teacher, plain_sgld  # noqa: E402

import condpost as cp  # noqa: E402

SETTINGS = {
    "independent": {"loss": "independent"},
    "gradient": {"loss": "gradient"},
    "gradient/thin10": {"loss": "gradient", "thin": 10},
    "independent/thin10": {"loss": "independent", "thin": 10},
}


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", default="5,4,3,4")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--steps", type=int, default=1200, help="steps per run (warmup 200 + draws)")
    p.add_argument("--step-size", type=float, default=1e-5)
    p.add_argument("--gamma", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated keys")
    p.add_argument("--profile", default=None, help="cProfile one condpost run of this setting")
    p.add_argument("--sort", default="tottime", help="cProfile sort key (with --profile)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = _ints(args.widths)
    teacher, _ = make_teacher(widths, "full", seed=0)
    x, y = make_data(teacher, args.n, seed=1)
    nbeta = args.n / math.log(args.n)
    net = make_dln(widths, teacher)
    post = cp.LocalPosterior(
        net, data=(x, y), likelihood=cp.Gaussian(1.0), nbeta=nbeta, localization=args.gamma
    )
    warmup = 200
    draws = args.steps - warmup

    def run_cp(kw):
        thin = kw.get("thin", 1)
        t, c = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            post.sample(
                "sgld",
                chains=1,
                warmup=warmup,
                draws=draws // thin,
                step_size=args.step_size,
                batch_size=args.batch,
                seed=0,
                progress=False,
                **kw,
            )
        steps = warmup + (draws // thin) * thin
        return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps

    def run_plain():
        t, c = time.perf_counter(), time.process_time()
        plain_sgld(
            copy.deepcopy(net),
            x,
            y,
            nbeta=nbeta,
            localization=args.gamma,
            step_size=args.step_size,
            steps=args.steps,
            batch_size=args.batch,
            seed=0,
        )
        return (time.perf_counter() - t) / args.steps, (time.process_time() - c) / args.steps

    if args.profile:
        import cProfile
        import pstats

        run_cp(SETTINGS[args.profile])  # warm
        pr = cProfile.Profile()
        pr.enable()
        run_cp(SETTINGS[args.profile])
        pr.disable()
        pstats.Stats(pr).sort_stats(args.sort).print_stats(30)
        return

    keys = [k.strip() for k in args.settings.split(",") if k.strip()]
    run_plain()  # warm up both (lazy initialisations, allocator)
    for k in keys:
        run_cp(SETTINGS[k])
    # [wall, cpu] per step; ratios of each condpost run to the plain run just before it
    times: dict[str, list] = {"plain": [], **{k: [] for k in keys}}
    ratios: dict[str, list] = {k: [] for k in keys}
    for _ in range(args.repeats):
        for k in keys:
            tp = run_plain()
            tc = run_cp(SETTINGS[k])
            times["plain"].append(tp)
            times[k].append(tc)
            ratios[k].append((tc[0] / tp[0], tc[1] / tp[1]))

    def med(xs, i):
        return statistics.median(x[i] for x in xs)

    print(
        f"DLN {widths}, n = {args.n}, batch {args.batch}, 1 chain, {args.steps} steps per run, "
        f"{args.threads} thread(s), {args.repeats} interleaved repeats (a plain run before each "
        f"condpost run); medians. 'cpu' is the process CPU time (time.process_time), which a "
        f"loaded machine disturbs less than the wall clock."
    )
    hdr = ["sampler", "wall µs/step", "cpu µs/step", "wall ratio", "cpu ratio"]
    rows = [
        [
            "plain loop (benchmarks/_dln.py)",
            *(f"{1e6 * med(times['plain'], i):.1f}" for i in (0, 1)),
            "1.00×",
            "1.00×",
        ]
    ]
    for k in keys:
        rows.append(
            [
                f"condpost sgld, loss={k}",
                *(f"{1e6 * med(times[k], i):.1f}" for i in (0, 1)),
                *(f"{med(ratios[k], i):.2f}×" for i in (0, 1)),
            ]
        )
    w = [max(len(str(r[j])) for r in [hdr, *rows]) for j in range(len(hdr))]
    for r in [hdr, *rows]:
        print(
            "  ".join(str(v).ljust(w[j]) if j == 0 else str(v).rjust(w[j]) for j, v in enumerate(r))
        )
    print(
        "target: ≤ 1.15× the plain loop per step at 1 chain; the default (loss='independent') "
        "does one more forward pass per kept draw than the plain loop, loss='gradient' is "
        "equal work"
    )


if __name__ == "__main__":
    main()
