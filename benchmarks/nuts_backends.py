"""condpost-Pyro vs condpost-NumPyro vs a hand-written native-JAX NumPyro model (issue 4).

All three sample the same conditioned local posterior, in one process, with the same
chains, warmup, draws, target_accept (0.8) and max tree depth (10):

* **condpost-Pyro**: ``post.sample("nuts", backend="pyro")``: Pyro's NUTS on the torch
  potential (torch with 1 intra-op thread, its fastest setting here).
* **condpost-NumPyro**: ``post.sample("nuts", backend="numpyro")``: the same
  declaration, its potential exported to JAX (``condpost.export.to_jax``) and sampled by
  NumPyro's NUTS.
* **native JAX**: what a researcher writes by hand in JAX: the MLP and the constraint in
  ``jax.numpy``, one flat site ``w ~ Normal(w*, γ^{-1/2})``, the likelihood inside
  ``handlers.scale(nβ/n)`` and a ``plate``, the constraint as ``numpyro.factor``, run by
  ``MCMC(NUTS(model, init_strategy=init_to_value(w*)))``.

Problem: MLP 1→16→16→1 tanh (321 parameters), n = 200 points of y = sin(3x) + 0.1ε,
trained to a minimum (``nuts_overhead.make_problem``); Gaussian likelihood with scale
0.1; nβ = n/log n; γ = 100; one ``Activations`` constraint on the second hidden layer
(site ``"3"``) at 32 probe inputs with tolerance σ = 0.05. The script checks that the
native potential equals condpost's at random points before timing anything.

Timings (per sampler):

* ``call``: the whole user-facing call. condpost: ``post.sample`` (export + compile +
  sampling + the ``ReferenceClass``'s per-draw L_n and virial in torch). Native:
  ``MCMC.warmup`` + ``MCMC.run`` + ``get_samples`` (no L_n: a user would still need it).
* ``loop``: sampling alone, compilation excluded. condpost-NumPyro:
  ``settings["run_time_s"]``; native: ``call`` minus XLA compile time (measured with a
  ``jax.monitoring`` listener); condpost-Pyro: ``settings["wall_time_s"]``.
* ``export`` and ``compile``: condpost-NumPyro's ``settings["export_time_s"]`` and
  ``settings["compile_time_s"]``; native compile from the same listener.

Gradient evaluations: condpost's ``settings["gradient_evaluations"]``; native: the sum of
NumPyro's per-iteration ``num_steps`` over warmup and draws, plus one.
ESS: bulk ESS (``condpost.diagnostics.ess_bulk``) of L_n at the draws, with L_n computed
in float64 by the same function for all three samplers.

Usage::

    python benchmarks/nuts_backends.py                   # 300 + 300, 1 chain, float32
    python benchmarks/nuts_backends.py --repeats 3 --vary-seed
    python benchmarks/nuts_backends.py --quick           # 100 + 100, smoke test
    python benchmarks/nuts_backends.py --dtype float64
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nuts_overhead import make_problem, md_table  # noqa: E402

import condpost as cp  # noqa: E402
from condpost.diagnostics import ess_bulk  # noqa: E402
from condpost.infer.base import chain_seeds  # noqa: E402

TARGET_VS_PYRO = 10.0
TARGET_VS_NATIVE = 1.1
SIGMA = 0.05
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ---------------------------------------------------------------------------- compile clock
class CompileClock:
    """Sums XLA backend compile time reported through ``jax.monitoring``."""

    def __init__(self):
        import jax

        self.total = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kw):
        # tracing, lowering to MLIR and XLA compilation (what AOT lower+compile covers)
        if event.startswith("/jax/core/compile/") and event.endswith("_duration"):
            self.total += duration


# ---------------------------------------------------------------------------- native model
class Native:
    """The hand-written JAX/NumPyro model: MLP, likelihood, localizer, constraint."""

    def __init__(self, post, x, y, probes, h_star, scale, nbeta, gamma, jdtype):
        import jax.numpy as jnp

        self.jnp = jnp
        self.X = jnp.asarray(x.double().numpy(), dtype=jdtype)
        self.Y = jnp.asarray(y.double().numpy()[:, 0], dtype=jdtype)
        self.P = jnp.asarray(probes.double().numpy(), dtype=jdtype)
        self.h_star = jnp.asarray(h_star.double().numpy(), dtype=jdtype)
        self.w_star = jnp.asarray(post.center.double().numpy(), dtype=jdtype)
        self.scale, self.nbeta, self.gamma, self.n = scale, nbeta, gamma, x.shape[0]
        # the flat layout: 0.weight [16,1], 0.bias, 2.weight [16,16], 2.bias, 4.weight, 4.bias
        self.sl = {nm: post.lifted.slice_of(nm) for nm in post.lifted.names}

    def layers(self, w, x):
        jnp, sl = self.jnp, self.sl
        W1, b1 = w[sl["0.weight"]].reshape(16, 1), w[sl["0.bias"]]
        W2, b2 = w[sl["2.weight"]].reshape(16, 16), w[sl["2.bias"]]
        W3, b3 = w[sl["4.weight"]].reshape(1, 16), w[sl["4.bias"]]
        h1 = jnp.tanh(x @ W1.T + b1)
        h2 = jnp.tanh(h1 @ W2.T + b2)
        return (h2 @ W3.T + b3)[:, 0], h2

    def model(self):
        import numpyro
        import numpyro.distributions as dist
        from numpyro import handlers

        jnp = self.jnp
        w = numpyro.sample("w", dist.Normal(self.w_star, self.gamma**-0.5).to_event(1))
        out, _ = self.layers(w, self.X)
        with handlers.scale(scale=self.nbeta / self.n), numpyro.plate("data", self.n):
            numpyro.sample("y", dist.Normal(out, self.scale), obs=self.Y)
        _, h = self.layers(w, self.P)
        numpyro.factor("constraint/act", -jnp.sum((h - self.h_star) ** 2) / (2 * SIGMA**2))

    def potential(self, w):
        """U(w) of docs/theory.md §1.2, written out (for the equality check and the micro timing)."""
        jnp = self.jnp
        out, _ = self.layers(w, self.X)
        r = (self.Y - out) / self.scale
        nll = 0.5 * r * r + math.log(self.scale) + 0.5 * math.log(2 * math.pi)
        _, h = self.layers(w, self.P)
        return (
            self.nbeta * jnp.mean(nll)
            + 0.5 * self.gamma * jnp.sum((w - self.w_star) ** 2)
            + jnp.sum((h - self.h_star) ** 2) / (2 * SIGMA**2)
        )


# ---------------------------------------------------------------------------- runners
def run_pyro(post, args, seed):
    t0 = time.perf_counter()
    ref = post.sample(
        "nuts",
        backend="pyro",
        chains=args.chains,
        warmup=args.warmup,
        draws=args.draws,
        seed=seed,
        progress=False,
        num_threads=1,
    )
    call = time.perf_counter() - t0
    s = ref.settings
    return {
        "W": ref.flat(),
        "call": call,
        "loop": s["wall_time_s"],
        "grads": s["gradient_evaluations"],
        "div": int(ref.diverging.sum()),
        "export": float("nan"),
        "compile": float("nan"),
    }


def run_cp_numpyro(post, args, seed):
    # cold start, like the native model (condpost caches the export and the compiled
    # sampler on the declaration; a re-run with another seed would skip both)
    post.__dict__.pop("_condpost_numpyro_cache", None)
    t0 = time.perf_counter()
    ref = post.sample(
        "nuts",
        backend="numpyro",
        chains=args.chains,
        warmup=args.warmup,
        draws=args.draws,
        seed=seed,
        progress=False,
    )
    call = time.perf_counter() - t0
    s = ref.settings
    return {
        "W": ref.flat(),
        "call": call,
        "loop": s["run_time_s"],
        "grads": s["gradient_evaluations"],
        "div": int(ref.diverging.sum()),
        "export": s["export_time_s"],
        "compile": s["compile_time_s"],
        "cached": bool(s.get("compile_cached")),
    }


def run_native(native, args, seed, clock):
    import jax
    import numpy as onp
    from numpyro.infer import MCMC, NUTS, init_to_value

    c0 = clock.total
    t0 = time.perf_counter()
    kernel = NUTS(
        native.model,
        target_accept_prob=0.8,
        max_tree_depth=10,
        init_strategy=init_to_value(values={"w": native.w_star}),
    )
    mcmc = MCMC(
        kernel,
        num_warmup=args.warmup,
        num_samples=args.draws,
        num_chains=args.chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    keys = [jax.random.PRNGKey(s) for s in chain_seeds(seed, args.chains)]
    key = keys[0] if args.chains == 1 else jax.numpy.stack(keys)
    mcmc.warmup(key, collect_warmup=True, extra_fields=("num_steps",))
    warm_steps = onp.asarray(mcmc.get_extra_fields()["num_steps"]).sum()
    mcmc.run(key, extra_fields=("num_steps", "diverging"))
    W = onp.asarray(mcmc.get_samples(group_by_chain=True)["w"])
    call = time.perf_counter() - t0
    ex = mcmc.get_extra_fields()
    compile_s = clock.total - c0
    return {
        "W": W,
        "call": call,
        "loop": call - compile_s,
        "grads": int(warm_steps + onp.asarray(ex["num_steps"]).sum() + args.chains),
        "div": int(onp.asarray(ex["diverging"]).sum()),
        "export": float("nan"),
        "compile": compile_s,
    }


# ---------------------------------------------------------------------------- micro
def micro(post, jp, native, reps):
    """ms per value-and-gradient: jitted native U, jitted exported U, eager torch U."""
    import jax

    w0 = native.w_star
    fns = {
        "native JAX U(w)": jax.jit(jax.value_and_grad(native.potential)),
        "exported U(w)": jax.jit(jax.value_and_grad(jp.potential)),
    }
    for f in fns.values():
        jax.block_until_ready(f(w0))
    # interleaved blocks, best of 10 each: bursts of load on a shared machine hit both
    best = {k: math.inf for k in fns}
    for _ in range(10):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                r = f(w0)
            jax.block_until_ready(r)
            best[name] = min(best[name], (time.perf_counter() - t0) / reps)
    out = {k: v * 1e3 for k, v in best.items()}
    w = post.center.clone()
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        blocks = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(max(reps // 10, 10)):
                z = w.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(post.potential(z), z)
            blocks.append((time.perf_counter() - t0) / max(reps // 10, 10))
    finally:
        torch.set_num_threads(prev)
    out["torch U(w), eager (Pyro's)"] = min(blocks) * 1e3
    return out


# ---------------------------------------------------------------------------- report
def machine() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            names = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        load = ", load average {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())
    except OSError:
        load = ""
    import jax

    devs = ", ".join(str(d) for d in jax.devices())
    return (
        f"{platform.system()} {platform.machine()}, {cpu or 'unknown CPU'}, "
        f"os.cpu_count() = {os.cpu_count()}, JAX devices: {devs}{load}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 warmup + 100 draws")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--draws", type=int, default=300)
    ap.add_argument("--chains", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="runs per sampler (rotating order)")
    ap.add_argument("--vary-seed", action="store_true", help="repeat r uses seed + r")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-pyro", action="store_true", help="only the two JAX samplers")
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup = args.draws = 100
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(1)

    import jax

    clock = CompileClock()
    n, scale, gamma = 200, 0.1, 100.0
    nbeta = n / math.log(n)
    net, x, y = make_problem(n, scale, 0, dtype)
    probes = torch.linspace(-1, 1, 32, dtype=dtype)[:, None]
    post = cp.LocalPosterior(
        net, data=(x, y), likelihood=cp.Gaussian(scale=scale), nbeta=nbeta, localization=gamma
    )
    post.preserve(cp.Activations("3", probes, tolerance=SIGMA, name="act"))
    h_star = post.constraints[0].target
    use64 = dtype == torch.float64
    jdt = jax.numpy.float64 if use64 else jax.numpy.float32
    post64 = post._replace(dtype=torch.float64)

    print(
        f"problem: MLP 1-16-16-1 tanh, d={post.d}, n={n}, nβ={nbeta:.4g}, γ={gamma:g}, "
        f"Activations('3', 32 probes, σ={SIGMA}), {args.dtype}, {args.chains} chain(s) × "
        f"({args.warmup} warmup + {args.draws} draws); L_n(w*)={post.loss_center:.4f}"
    )
    print(f"machine: {machine()}")
    with jax.enable_x64(use64):
        from condpost.export import to_jax

        jp = to_jax(post)
        native = Native(post, x, y, probes, h_star, scale, nbeta, gamma, jdt)
        rng = np.random.default_rng(0)
        errs = []
        for _ in range(5):
            w = post.center.double().numpy() + 0.05 * rng.standard_normal(post.d)
            wj = jax.numpy.asarray(w, dtype=jdt)
            u_n, u_e = float(native.potential(wj)), float(jp.potential(wj))
            u_t = float(post64.potential(torch.as_tensor(w)))
            errs.append(max(abs(u_n - u_t), abs(u_e - u_t)) / abs(u_t))
        print(f"check: max relative |U_native − U_torch|, |U_exported − U_torch| = {max(errs):.2e}")
        mic = micro(post, jp, native, reps=300 if args.quick else 1000)
        print("per-gradient cost (value + gradient, ms, best of 10 interleaved blocks):")
        for k, v in mic.items():
            print(f"  {k:30s} {v:.4f}")

        names = ["condpost-NumPyro", "native JAX"] + ([] if args.skip_pyro else ["condpost-Pyro"])
        runs = {k: [] for k in names}
        for r in range(args.repeats):
            seed = args.seed + r if args.vary_seed else args.seed
            order = names[r % len(names) :] + names[: r % len(names)]
            for which in order:
                if which == "condpost-NumPyro":
                    res = run_cp_numpyro(post, args, seed)
                elif which == "native JAX":
                    res = run_native(native, args, seed, clock)
                else:
                    res = run_pyro(post, args, seed)
                W = torch.from_numpy(np.array(res["W"], dtype=np.float64)).reshape(-1, post.d)
                loss = post64.evaluate(W, grad=False)
                res["loss"] = loss["loss"].numpy().reshape(args.chains, args.draws)
                res["ess"] = float(ess_bulk(res["loss"]))
                runs[which].append(res)
                print(
                    f"repeat {r + 1}/{args.repeats} {which:17s}: call {res['call']:.2f}s, loop "
                    f"{res['loop']:.2f}s, compile {res['compile']:.2f}s, grads {res['grads']}, "
                    f"div {res['div']}, ESS(L_n) {res['ess']:.0f}"
                )

    stats = {}
    rows = []
    for which in names:
        rr = runs[which]

        def med(key, rr=rr):
            return statistics.median(r[key] for r in rr)

        def best(key, rr=rr):
            return min(r[key] for r in rr)

        s = {
            "call": med("call"),
            "call_best": best("call"),
            "loop": med("loop"),
            "loop_best": best("loop"),
            "export": med("export"),
            "compile": med("compile"),
            "grads": med("grads"),
            "ess": med("ess"),
            "div": med("div"),
        }
        s["gps"] = statistics.median(r["grads"] / r["loop"] for r in rr)
        s["ess_call"] = statistics.median(r["ess"] / r["call"] for r in rr)
        s["ess_loop"] = statistics.median(r["ess"] / r["loop"] for r in rr)
        s["per_grad_ms"] = statistics.median(1e3 * r["loop"] / r["grads"] for r in rr)
        stats[which] = s
        rows.append(
            [
                which,
                s["call"],
                s["call_best"],
                s["loop"],
                s["export"],
                s["compile"],
                s["grads"],
                s["gps"],
                s["div"],
                s["ess"],
                s["ess_call"],
                s["ess_loop"],
            ]
        )
    raw = md_table(
        [
            "sampler",
            "call s*",
            "best call s*",
            "loop s*",
            "export s*",
            "compile s*",
            "grad evals",
            "grads/s (loop)*",
            "divergent",
            "bulk ESS L_n",
            "ESS/s, call*",
            "ESS/s, loop*",
        ],
        rows,
    )
    c, nat = stats["condpost-NumPyro"], stats["native JAX"]
    ratio_rows = [
        [
            "condpost-NumPyro / native: ESS/s of L_n, call",
            c["ess_call"] / nat["ess_call"],
            f"≥ {1 / TARGET_VS_NATIVE:.3f}",
        ],
        [
            "condpost-NumPyro / native: ESS/s of L_n, loop",
            c["ess_loop"] / nat["ess_loop"],
            f"≥ {1 / TARGET_VS_NATIVE:.3f}",
        ],
        [
            "native / condpost-NumPyro: time per gradient in the loop",
            nat["per_grad_ms"] / c["per_grad_ms"],
            f"≥ {1 / TARGET_VS_NATIVE:.3f}",
        ],
        [
            "native / exported: value+gradient, jitted, outside the sampler",
            mic["native JAX U(w)"] / mic["exported U(w)"],
            f"≥ {1 / TARGET_VS_NATIVE:.3f}",
        ],
    ]
    if "condpost-Pyro" in stats:
        p = stats["condpost-Pyro"]
        ratio_rows = [
            [
                "condpost-NumPyro / condpost-Pyro: ESS/s of L_n, call",
                c["ess_call"] / p["ess_call"],
                f"≥ {TARGET_VS_PYRO:g}",
            ],
            [
                "condpost-NumPyro / condpost-Pyro: ESS/s of L_n, loop",
                c["ess_loop"] / p["ess_loop"],
                f"≥ {TARGET_VS_PYRO:g}",
            ],
            [
                "condpost-NumPyro / condpost-Pyro: gradients/s",
                c["gps"] / p["gps"],
                "–",
            ],
            [
                "condpost-Pyro / condpost-NumPyro: wall time, call",
                p["call"] / c["call"],
                "–",
            ],
        ] + ratio_rows
    for rrow in ratio_rows:
        tgt = rrow[2]
        rrow.append("–" if tgt == "–" else ("yes" if rrow[1] >= float(tgt[2:]) else "no"))
    ratios = md_table(["ratio", "value", "target", "met"], ratio_rows)
    mic_tab = md_table(
        ["potential", "ms per value+gradient*", "vs native"],
        [[k, v, v / mic["native JAX U(w)"]] for k, v in mic.items()],
    )
    given = sys.argv[1:] if argv is None else argv
    print(f"\n### Run: `python benchmarks/nuts_backends.py {' '.join(given)}`".rstrip())
    print(f"\n- **Date:** {_dt.date.today().isoformat()}")
    print(f"- **Machine:** {machine()}")
    import numpyro
    import pyro

    print(
        f"- **Versions:** torch {torch.__version__}, pyro-ppl {pyro.__version__}, jax "
        f"{jax.__version__}, numpyro {numpyro.__version__}, condpost {cp.__version__}"
    )
    print(
        f"- **Run:** {args.chains} chain(s), {args.warmup} warmup + {args.draws} draws, "
        f"{args.dtype}, {args.repeats} repeat(s) per sampler (medians; 'best' = minimum), seed "
        f"{args.seed}{' + r' if args.vary_seed else ''}. Columns marked * are absolute times "
        f"on a shared machine; compare ratios."
    )
    print("\nRatios:\n\n" + ratios)
    print("\nRaw:\n\n" + raw)
    print("\nOne value-and-gradient outside the sampler:\n\n" + mic_tab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
