"""Overhead of condpost's Pyro NUTS against a hand-written Pyro NUTS model (issue 2).

Both samplers run in one process on the same problem, one after the other:

* **condpost**: ``LocalPosterior(...).sample("nuts", ...)``. Pyro's NUTS kernel driven
  on the potential ``U(w)``, started at ``w*``.
* **anchor**: what a researcher writes today. A Pyro model with one flat latent site
  ``w ~ Normal(w*, γ^{-1/2}).to_event(1)``, the network evaluated with
  ``torch.func.functional_call``, the likelihood inside ``poutine.scale(nβ/n)`` and
  ``pyro.plate``, run by ``MCMC(NUTS(model, init_strategy=init_to_value(...)))``.

Problem (the measured NUTS anchor): MLP 1→16→16→1 tanh (321
parameters), n = 200 points of ``y = sin(3x) + 0.1 ε``, the MLP trained to a minimum
(Adam, then full-batch L-BFGS), Gaussian likelihood with scale 0.1, nβ = n/log n,
γ = 100 (prior sd 0.1), 300 warmup + 300 draws, 1 chain, target_accept 0.8, max tree
depth 10.

Seeds. condpost derives each chain's seed from the user seed
(``condpost.infer.nuts.chain_seeds``). The anchor is seeded with ``pyro.set_rng_seed``
on that same per-chain seed, so both kernels start from the same torch RNG state.
The two potentials differ only in floating-point rounding, so early trajectories
match and later ones may drift apart. Every repeat uses the same seed. Repeats differ
only in timing (on CPU the draws are deterministic), and the medians are reported.

Timed quantities (the training and the construction of ``LocalPosterior`` are not
timed as sampling; the construction is reported separately):

* ``loop``: the sampler itself. condpost: ``settings["wall_time_s"]`` (kernel setup and
  the NUTS loop). Anchor: ``MCMC.run``, which covers the same ground.
* ``call``: the whole user-facing call. condpost: ``post.sample(...)``, which also
  evaluates ``L_n`` and the virial at every draw for the ``ReferenceClass``. Anchor:
  building the kernel, ``MCMC.run`` and ``get_samples``. The anchor does not compute
  ``L_n``; a user would still have to do that.

Gradient evaluations: condpost's ``settings["gradient_evaluations"]`` counts calls of
its potential function (all gradient evaluations, plus one or two plain energy
evaluations during setup). For the anchor the script counts model executions with
``w.requires_grad``, i.e. the gradient evaluations exactly.

ESS: bulk ESS (``condpost.diagnostics.ess_bulk``) of ``L_n`` at the draws, computed by
the same function for both samplers, and the minimum bulk ESS over the 321
coordinates. ESS/s divides by the ``call`` wall time (and, in a second column, by the
``loop`` wall time).

Usage::

    python benchmarks/nuts_overhead.py                     # 300 + 300, 1 repeat, float32
    python benchmarks/nuts_overhead.py --repeats 3 --write-docs
    python benchmarks/nuts_overhead.py --quick             # 100 + 100, smoke test
    python benchmarks/nuts_overhead.py --dtype float64
    python benchmarks/nuts_overhead.py --profile           # cProfile of one condpost run
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as _dt
import io
import math
import os
import platform
import pstats
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide.initialization import init_to_value
from pyro.infer.mcmc import MCMC, NUTS
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.integrator import potential_grad
from torch import nn
from torch.func import functional_call

import condpost as cp
from condpost.diagnostics import ess_bulk
from condpost.infer.base import chain_seeds

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Pyro NUTS overhead (issue 2)"
TARGET = 1.15

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------- problem
def make_problem(n: int, scale: float, seed: int, dtype: torch.dtype):
    """Data and an MLP trained to a minimum of the Gaussian NLL (in float64, then cast)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.sin(3 * x) + scale * torch.randn(n, 1, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    net = net.double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(1000):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    lbfgs = torch.optim.LBFGS(
        net.parameters(),
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        lbfgs.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        return loss

    lbfgs.step(closure)
    net = net.to(dtype).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net, x.to(dtype), y.to(dtype)


class Anchor:
    """The hand-written Pyro model: one flat site, functional_call, scale + plate."""

    def __init__(self, net, x, y, scale, nbeta, gamma, w_star):
        self.net, self.x, self.y1 = net, x, y.reshape(-1)
        self.scale, self.nbeta, self.n = scale, nbeta, x.shape[0]
        self.prior_sd = gamma**-0.5
        self.w_star = w_star.clone()
        self.names = [k for k, _ in net.named_parameters()]
        self.shapes = [p.shape for _, p in net.named_parameters()]
        self.numels = [p.numel() for _, p in net.named_parameters()]
        self.grads = 0

    def unflatten(self, w):
        out, i = {}, 0
        for k, s, m in zip(self.names, self.shapes, self.numels, strict=True):
            out[k] = w[i : i + m].reshape(s)
            i += m
        return out

    def model(self):
        w = pyro.sample("w", dist.Normal(self.w_star, self.prior_sd).to_event(1))
        if w.requires_grad and torch.is_grad_enabled():
            self.grads += 1
        f = functional_call(self.net, self.unflatten(w), (self.x,)).squeeze(-1)
        with pyro.poutine.scale(scale=self.nbeta / self.n), pyro.plate("data", self.n):
            pyro.sample("y", dist.Normal(f, self.scale), obs=self.y1)

    def loss(self, W: torch.Tensor) -> np.ndarray:
        """L_n at each row of W (mean Gaussian NLL, constants included), float64."""
        x = self.x.double()
        y = self.y1.double()
        net = self.net
        out = []
        with torch.no_grad():
            for w in W.double():
                p = {k: v.double() for k, v in self.unflatten(w).items()}
                f = functional_call(net, p, (x,)).squeeze(-1)
                nll = 0.5 * ((y - f) / self.scale) ** 2 + math.log(self.scale)
                out.append(float((nll + 0.5 * math.log(2 * math.pi)).mean()))
        return np.asarray(out)


# ---------------------------------------------------------------------------- runners
def run_condpost(post, args, seed):
    t0 = time.perf_counter()
    ref = post.sample(
        "nuts",
        chains=1,
        warmup=args.warmup,
        draws=args.draws,
        seed=seed,
        progress=False,
        target_accept=0.8,
        max_tree_depth=10,
    )
    call = time.perf_counter() - t0
    div = ref.diverging
    return {
        "W": torch.as_tensor(ref.flat()[0]),
        "loss_cp": ref.loss()[0],
        "call": call,
        "loop": float(ref.settings["wall_time_s"]),
        "grads": int(ref.settings["gradient_evaluations"]),
        "step": float(ref.stat("sampler/step_size")[0])
        if _has(ref, "sampler/step_size")
        else float("nan"),
        "div": int(np.asarray(div).sum()),
    }


def _has(ref, key):
    try:
        ref.stat(key)
    except Exception:  # noqa: BLE001
        return False
    return True


def run_anchor(anchor, args, seed):
    anchor.grads = 0
    t0 = time.perf_counter()
    pyro.set_rng_seed(chain_seeds(seed, 1)[0])
    kernel = NUTS(
        anchor.model,
        target_accept_prob=0.8,
        max_tree_depth=10,
        init_strategy=init_to_value(values={"w": anchor.w_star.clone()}),
    )
    mcmc = MCMC(kernel, num_samples=args.draws, warmup_steps=args.warmup, disable_progbar=True)
    t1 = time.perf_counter()
    mcmc.run()
    loop = time.perf_counter() - t1
    W = mcmc.get_samples()["w"].detach()
    call = time.perf_counter() - t0
    try:
        div = int(len(mcmc.diagnostics()["divergences"]["chain 0"]))
    except Exception:  # noqa: BLE001
        div = -1
    return {
        "W": W,
        "call": call,
        "loop": loop,
        "grads": anchor.grads,
        "step": float(kernel.step_size),
        "div": div,
    }


def summarize(res, anchor):
    loss = anchor.loss(res["W"])
    res["loss"] = loss
    res["ess_loss"] = float(ess_bulk(loss[None, :]))
    res["ess_min"] = float(np.nanmin(ess_bulk(res["W"].double().numpy()[None])))
    return res


# ---------------------------------------------------------------------------- micro
def micro(post, anchor, reps: int = 300):
    """Cost of one value-and-gradient of each potential (median of 5 blocks)."""
    w0 = post.center.clone()

    def cp_fn(z):
        return post.potential(z["w"])

    anchor_init = init_to_value(values={"w": anchor.w_star.clone()})
    _, pyro_fn, _, _ = initialize_model(anchor.model, init_strategy=anchor_init)
    offs = [0]
    for m in anchor.numels:
        offs.append(offs[-1] + m)
    wl = [(s, o, m) for s, o, m in zip(anchor.shapes, offs, anchor.numels, strict=False)]
    names = anchor.names
    nb, n, sc = anchor.nbeta, anchor.n, anchor.scale
    x, y1, c = anchor.x, anchor.y1, anchor.w_star
    gam = anchor.prior_sd**-2

    def bare_fn(z):
        w = z["w"]
        p = {k: w[o : o + m].reshape(s) for k, (s, o, m) in zip(names, wl, strict=True)}
        f = functional_call(anchor.net, p, (x,)).squeeze(-1)
        return nb / n * (0.5 * ((y1 - f) / sc) ** 2).sum() + 0.5 * gam * ((w - c) ** 2).sum()

    out = {}
    for name, fn in (
        ("condpost U(w)", cp_fn),
        ("Pyro model potential", pyro_fn),
        ("bare torch", bare_fn),
    ):
        for _ in range(20):
            potential_grad(fn, {"w": w0.clone()})
        blocks = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps // 5):
                potential_grad(fn, {"w": w0.clone()})
            blocks.append((time.perf_counter() - t0) / (reps // 5))
        out[name] = statistics.median(blocks) * 1e3
    return out


# ---------------------------------------------------------------------------- report
def fmt(v, nd=3):
    if isinstance(v, str):
        return v
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}g}"


def md_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def med(runs, key):
    return statistics.median(r[key] for r in runs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 warmup + 100 draws (smoke test)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per sampler (alternating)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--vary-seed",
        action="store_true",
        help="repeat r uses seed + r (both samplers alike), so ESS medians cover several chains",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both samplers (default 1; 0 keeps torch's default)",
    )
    ap.add_argument("--write-docs", action="store_true", help=f"write '{SECTION}' in docs")
    ap.add_argument("--profile", action="store_true", help="cProfile one condpost run")
    ap.add_argument("--no-micro", action="store_true", help="skip the per-gradient timings")
    args = ap.parse_args(argv)
    args.warmup = args.draws = 100 if args.quick else 300
    dtype = DTYPES[args.dtype]
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    n, scale, gamma = 200, 0.1, 100.0
    nbeta = n / math.log(n)
    t0 = time.perf_counter()
    net, x, y = make_problem(n, scale, args.seed, dtype)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    post = cp.LocalPosterior(
        net, data=(x, y), likelihood=cp.Gaussian(scale=scale), nbeta=nbeta, localization=gamma
    )
    t_build = time.perf_counter() - t0
    w_star = post.center.clone()
    anchor = Anchor(net, x, y, scale, nbeta, gamma, w_star)
    print(
        f"problem: MLP 1-16-16-1 tanh, d={post.d}, n={n}, nβ={nbeta:.4g}, γ={gamma:g}, "
        f"scale={scale}, dtype={args.dtype}, {args.warmup} warmup + {args.draws} draws, 1 chain; "
        f"L_n(w*)={post.loss_center:.4f}, |∇(nβL_n)(w*)|={post.center_check.get('grad_norm')}"
    )
    print(f"train {t_train:.1f}s, LocalPosterior construction {t_build:.2f}s (not in timings)")
    print(f"torch threads: {torch.get_num_threads()}")

    # untimed warm-up of both potentials (lazy init, allocator)
    mic = micro(post, anchor, reps=50 if args.no_micro else 500)
    if not args.no_micro:
        print("\nper-gradient cost (value + gradient, ms, median of 5 blocks):")
        for k, v in mic.items():
            print(f"  {k:22s} {v:.3f}")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        run_condpost(post, args, args.seed)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
        print(s.getvalue())
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(40)
        print(s.getvalue())
        return 0

    runs = {"condpost": [], "anchor": []}
    for r in range(args.repeats):
        order = ("condpost", "anchor") if r % 2 == 0 else ("anchor", "condpost")
        seed = args.seed + r if args.vary_seed else args.seed
        for which in order:
            if which == "condpost":
                res = run_condpost(post, args, seed)
            else:
                res = run_anchor(anchor, args, seed)
            runs[which].append(summarize(res, anchor))
            print(
                f"repeat {r + 1}/{args.repeats} {which:8s}: call {res['call']:.1f}s, loop "
                f"{res['loop']:.1f}s, grads {res['grads']}, ESS(L_n) {res['ess_loss']:.0f}, "
                f"min ESS {res['ess_min']:.0f}"
            )
    c0 = runs["condpost"][0]
    dl = float(np.max(np.abs(c0["loss"] - c0["loss_cp"])))
    print(f"check: |L_n(condpost ref.loss()) - L_n(benchmark)| max = {dl:.2e}")

    rows, stats = [], {}
    for which in ("anchor", "condpost"):
        rr = runs[which]
        s = {
            "call": med(rr, "call"),
            "loop": med(rr, "loop"),
            "grads": med(rr, "grads"),
            "ess_loss": med(rr, "ess_loss"),
            "ess_min": med(rr, "ess_min"),
            "step": med(rr, "step"),
            "div": med(rr, "div"),
        }
        s["gps"] = s["grads"] / s["loop"]
        s["ess_loss_s"] = s["ess_loss"] / s["call"]
        s["ess_min_s"] = s["ess_min"] / s["call"]
        s["ess_loss_s_loop"] = s["ess_loss"] / s["loop"]
        s["ess_min_s_loop"] = s["ess_min"] / s["loop"]
        stats[which] = s
        name = "condpost `post.sample`" if which == "condpost" else "anchor (hand-written Pyro)"
        rows.append(
            [
                name,
                s["call"],
                s["loop"],
                s["grads"],
                s["gps"],
                s["step"],
                s["div"],
                s["ess_loss"],
                s["ess_min"],
                s["ess_loss_s"],
                s["ess_min_s"],
            ]
        )
    raw = md_table(
        [
            "sampler",
            "call s*",
            "loop s*",
            "grad evals",
            "grads/s*",
            "step size",
            "divergent",
            "ESS L_n",
            "min ESS",
            "ESS L_n/s*",
            "min ESS/s*",
        ],
        rows,
    )
    c, a = stats["condpost"], stats["anchor"]
    ratio_rows = [
        ["wall time, whole call (lower is better)", c["call"] / a["call"], f"≤ {TARGET}"],
        ["wall time, sampler loop", c["loop"] / a["loop"], f"≤ {TARGET}"],
        [
            "time per gradient (loop / grad evals)",
            (c["loop"] / c["grads"]) / (a["loop"] / a["grads"]),
            f"≤ {TARGET}",
        ],
        ["gradient evaluations", c["grads"] / a["grads"], "–"],
        [
            "ESS/s of L_n, whole call (higher is better)",
            c["ess_loss_s"] / a["ess_loss_s"],
            f"≥ {1 / TARGET:.3f}",
        ],
        [
            "min-coordinate ESS/s, whole call",
            c["ess_min_s"] / a["ess_min_s"],
            f"≥ {1 / TARGET:.3f}",
        ],
        [
            "ESS/s of L_n, sampler loop",
            c["ess_loss_s_loop"] / a["ess_loss_s_loop"],
            f"≥ {1 / TARGET:.3f}",
        ],
        [
            "min-coordinate ESS/s, sampler loop",
            c["ess_min_s_loop"] / a["ess_min_s_loop"],
            f"≥ {1 / TARGET:.3f}",
        ],
    ]
    for rrow in ratio_rows:
        v, tgt = rrow[1], rrow[2]
        if tgt.startswith("≤"):
            ok = "yes" if v <= TARGET else "no"
        elif tgt.startswith("≥"):
            ok = "yes" if v >= 1 / TARGET else "no"
        else:
            ok = "–"
        rrow.append(ok)
    ratios = md_table(["condpost / anchor", "ratio", "target", "met"], ratio_rows)
    note = (
        f"Medians over {args.repeats} repeat(s) per sampler, alternating order. Columns "
        f"marked * are absolute times on a noisy shared machine; compare ratios only."
    )
    print("\nraw (medians):\n" + raw)
    print("\n" + note)
    print("\nratios:\n" + ratios)
    if not args.no_micro:
        mic_tab = md_table(
            ["potential", "ms per value+gradient*", "vs bare torch"],
            [[k, v, v / mic["bare torch"]] for k, v in mic.items()],
        )
    else:
        mic_tab = ""

    if args.write_docs:
        given = sys.argv[1:] if argv is None else argv
        cmd = "python benchmarks/nuts_overhead.py " + " ".join(given)
        write_docs(args, cmd.strip(), raw, ratios, note, mic_tab)
    return 0


def machine() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{platform.system()} {platform.release()} {platform.machine()}, {cpu or 'unknown CPU'}, "
        f"os.cpu_count() = {os.cpu_count()}, torch threads {torch.get_num_threads()}, CPU only, "
        f"Python {platform.python_version()}"
    )


INTRO = """\
Compares `LocalPosterior.sample("nuts")` with the hand-written Pyro model a researcher
writes today, in one process, on the problem of the measured anchor:
MLP 1→16→16→1 tanh (321 parameters), n = 200 points of y = sin(3x) + 0.1ε, trained to a
minimum (Adam, then L-BFGS); Gaussian likelihood with scale 0.1; nβ = n/log n; γ = 100
(prior sd 0.1); 1 chain started at w*; target_accept 0.8; max tree depth 10.

- **Anchor:** one flat site `w ~ Normal(w*, 0.1).to_event(1)`, the network evaluated with
  `torch.func.functional_call`, the likelihood inside `poutine.scale(nβ/n)` and `plate`,
  run with `MCMC(NUTS(model, init_strategy=init_to_value(...)))`. It is seeded
  (`pyro.set_rng_seed`) with the per-chain seed condpost derives from the same user seed.
- **Timings:** *call* is the whole user-facing call. condpost's `post.sample` also
  evaluates L_n and the virial at every draw; the anchor's call is kernel + `MCMC.run` +
  `get_samples`, with no L_n. *loop* is the sampler alone: condpost's
  `settings["wall_time_s"]`, the anchor's `MCMC.run`. *Time per gradient* is loop time over
  gradient evaluations. This is the cleanest measure of overhead, because NUTS spends a
  different number of gradients on each chain.
- **ESS:** bulk ESS (`condpost.diagnostics.ess_bulk`) of L_n, and the minimum over the 321
  coordinates, for one chain of draws. Both samplers use the same kernel code, so ESS
  differences between them come from chain randomness. The two potentials round floats
  differently, so even with the same seed the chains part ways during the run: the
  adapted step sizes and gradient counts differ. With `--vary-seed` the medians are taken
  over several chains.
- **Threads:** torch runs with 1 intra-op thread (`--threads 1`, the default here). On this
  2-core shared machine, under other jobs' load, torch's default of 2 threads made one
  gradient about 8× slower and much noisier (4.7 ms against 0.59 ms). That slowdown
  hides framework overhead.
- Absolute times come from a shared, noisy machine and move by up to 2× between runs.
  Compare the ratios, which are measured within one run, and read absolute times
  (marked *) as indicative only.
"""


def write_docs(args, cmd, raw, ratios, note, mic_tab):
    block = [
        f"### Run: `{cmd}`",
        "",
        f"- **Date:** {_dt.date.today().isoformat()}",
        f"- **Machine:** {machine()}",
        f"- **Versions:** torch {torch.__version__}, pyro-ppl {pyro.__version__}, "
        f"condpost {cp.__version__}",
        f"- **Run:** {args.warmup} warmup + {args.draws} draws, {args.dtype}, seed {args.seed}"
        f"{' + r (--vary-seed)' if args.vary_seed else ' for every repeat'}. {note}",
        "",
        "Ratios condpost / anchor (target: overhead ≤ 1.15×):",
        "",
        ratios,
        "",
        "Raw medians:",
        "",
        raw,
        "",
    ]
    if mic_tab:
        block += [
            "One value-and-gradient of each potential outside the sampler (same w*):",
            "",
            mic_tab,
            "",
        ]
    block_text = "\n".join(block)
    head = f"### Run: `{cmd}`"

    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    pat = re.compile(r"^" + re.escape(SECTION) + r"[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    m = pat.search(text)
    runs: list[str] = []
    if m:
        parts = re.split(r"(?m)^(?=### Run: `)", m.group(0))
        runs = [p.rstrip("\n") for p in parts[1:]]
    runs = [r for r in runs if r.split("\n", 1)[0].strip() != head]
    runs.append(block_text.rstrip("\n"))
    section = SECTION + "\n\n" + INTRO + "\n" + "\n\n".join(runs) + "\n"
    if m:
        text = text[: m.start()] + section + ("\n" if text[m.end() :] else "") + text[m.end() :]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text.rstrip("\n") + "\n")
    print(f"\nwrote '{SECTION}' ({head}) to {DOCS}")


if __name__ == "__main__":
    sys.exit(main())
