"""``draws="auto"`` LLCs on deep linear networks and the regular model, against exact values.

Issue 12: at γ = 1, n = 2,000, nβ = n/log n, with the step chosen automatically
(``step_size="auto"``, ``condpost.calibrate_step_size``) or a given small fixed step, and
``draws="auto"`` (``condpost.auto.estimate_llc``, ``rtol`` 0.02), λ̂ must come within 5%
of the exact value on a DLN at the origin and at a full-rank teacher, and within 3% on
the regular model (docs/theory.md §4.2's exact finite-γ value).

Exact DLN targets: NUTS at the same (nβ, γ) on a 4-row dataset with the identical loss
function (``_dln.compress_data``), 4 chains, error = max(ESS s.e., chain-means s.e.).
Aoyagi's λ (the nβ → ∞ limit) is printed beside it.

Usage::

    python benchmarks/llc_auto.py                         # DLN origin + full, regular
    python benchmarks/llc_auto.py --cases regular --step 2e-4
    python benchmarks/llc_auto.py --step auto --cal-steps 400
    python benchmarks/llc_auto.py --cases origin --cal-top 2e-3   # ladder 2e-3 … 1.6e-5

A case whose run raises (e.g. the sampler diverges at the chosen step) is reported with
its error instead of stopping the script.
    python benchmarks/llc_auto.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

import torch  # noqa: E402
from _dln import aoyagi_lambda, compress_data, make_data, make_dln, make_teacher  # noqa: E402

import condpost as cp  # noqa: E402
from condpost.auto import estimate_llc  # noqa: E402


def dln_case(kind, widths, n, gamma, seed=0):
    teacher, r = make_teacher(widths, kind, seed=seed)
    x, y = make_data(teacher, n, seed=seed + 1)
    nbeta = n / math.log(n)
    post = cp.LocalPosterior(
        make_dln(widths, teacher), (x, y), cp.Gaussian(1.0), nbeta=nbeta, localization=gamma
    )
    xc, yc = compress_data(x, teacher)
    post_t = cp.LocalPosterior(
        make_dln(widths, teacher), (xc, yc), cp.Gaussian(1.0), nbeta=nbeta, localization=gamma
    )
    return post, post_t, aoyagi_lambda(widths, r), r


def nuts_target(post_t, args):
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = post_t.sample(
            "nuts",
            chains=args.nuts_chains,
            warmup=args.nuts_warmup,
            draws=args.nuts_draws,
            target_accept=0.95,
            seed=1,
            progress=False,
        )
    lam = ref.llc(warn_user=False)
    se = max(lam.stderr, lam.std / math.sqrt(len(lam.per_chain)))
    return lam.mean, se, time.perf_counter() - t


def run_auto(post, args, seed=0):
    step = args.step if args.step == "auto" else float(args.step)
    cal = None
    if step == "auto":
        cal = {} if args.cal_steps is None else {"steps": args.cal_steps}
        if args.cal_top is not None:  # a given ladder instead of the default 2/h_max top
            cal["step_sizes"] = [args.cal_top / 2.0**i for i in range(args.cal_rungs)][::-1]
    t = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lam = estimate_llc(
            post,
            "sgld",
            step_size=step,
            chains=args.chains,
            warmup=args.warmup,
            thin=args.thin,
            rtol=args.rtol,
            max_draws=args.max_draws,
            seed=seed,
            calibrate=cal,
            progress=False,
        )
    wall = time.perf_counter() - t
    return lam, wall, [str(w.message)[:160] for w in caught]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="regular,origin,full")
    p.add_argument("--widths", default="4,3,8")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--step", default="auto", help="'auto' or a number")
    p.add_argument(
        "--cal-steps",
        type=int,
        default=None,
        help="calibration steps per rung (default: calibrate_step_size's, 1000)",
    )
    p.add_argument(
        "--cal-top",
        type=float,
        default=None,
        help="top of the calibration ladder (default 2/h_max)",
    )
    p.add_argument("--cal-rungs", type=int, default=8, help="rungs below --cal-top, halving")
    p.add_argument("--chains", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--thin", type=int, default=5)
    p.add_argument("--rtol", type=float, default=0.02)
    p.add_argument("--max-draws", type=int, default=20000)
    p.add_argument("--nuts-chains", type=int, default=4)
    p.add_argument("--nuts-warmup", type=int, default=1000)
    p.add_argument("--nuts-draws", type=int, default=4000)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    widths = [int(v) for v in args.widths.split(",")]
    out = []
    for case in args.cases.split(","):
        if case == "regular":
            from analytic import linear_net, whitened_problem

            prob = whitened_problem(din=5, k=2, gamma=args.gamma, seed=4)
            post = cp.LocalPosterior(
                linear_net(prob), (prob.X, prob.Y), cp.Gaussian(prob.s), localization=args.gamma
            )
            exact, exact_se, t_exact, lam_inf = prob.expected_nbeta_dL(), 0.0, 0.0, post.d / 2
            label = f"regular d={post.d}, n=1000"
        else:
            post, post_t, lam_inf, r = dln_case(case, widths, args.n, args.gamma)
            exact, exact_se, t_exact = nuts_target(post_t, args)
            label = f"DLN {widths} {case} (r={r}), n={args.n}"
        try:
            lam, wall, warns = run_auto(post, args)
        except (FloatingPointError, RuntimeError, ValueError) as e:
            row = {
                "case": label,
                "d": post.d,
                "exact": exact,
                "exact_se": exact_se,
                "exact_time_s": t_exact,
                "error": f"{type(e).__name__}: {e}",
            }
            out.append(row)
            print(f"{label}: exact {exact:.4g} ± {exact_se:.2g}; FAILED {row['error']}", flush=True)
            continue
        rel = (lam.mean - exact) / exact
        row = {
            "case": label,
            "d": post.d,
            "nbeta": post.nbeta,
            "gamma": args.gamma,
            "exact": exact,
            "exact_se": exact_se,
            "exact_time_s": t_exact,
            "lambda_asymptotic": lam_inf,
            "llc": lam.mean,
            "stderr": lam.stderr,
            "rel_error": rel,
            "stop_reason": lam.run["stop_reason"],
            "limiting": lam.run["limiting"],
            "unmet": lam.run["unmet"],
            "draws": lam.run["draws"],
            "discard": lam.run["discard"],
            "step_size": lam.run.get("step_size", args.step),
            "rounds": [
                (r["draws"], round(r["llc"], 4), round(r["stderr"], 4)) for r in lam.run["rounds"]
            ],
            "wall_s": wall,
            "warnings": warns,
        }
        out.append(row)
        print(
            f"{label}: exact {exact:.4g} ± {exact_se:.2g} (λ∞ {lam_inf:g}); λ̂ {lam.mean:.4g} ± "
            f"{lam.stderr:.2g} ({rel:+.1%}); ε {row['step_size']}; {row['stop_reason']} "
            f"[{row['limiting']}] unmet {row['unmet']} at draws {row['draws']} (discard {row['discard']}), "
            f"{wall:.0f} s; rounds {row['rounds']}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
