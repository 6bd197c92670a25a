"""GPU-scale sampling (issue 7): many-chain ChEES-HMC against NumPyro NUTS and the raw
vmapped gradient rate, side by side in one run.

Problem: an MLP classifier (tanh), trained to a minimum with Adam, and its tempered
local posterior ``U(w) = nβ L_n(w) + γ/2‖w − w*‖²`` (nβ = n/log n, γ = 1), exported once
to JAX with ``condpost.export.to_jax``. Sizes:

* ``issue`` (default when a GPU is visible): 16 → 64 → 64 → 10, d = 5,898, n = 2,000,
  the MLP of issue 7's measurements;
* ``small`` (default on CPU): 4 → 8 → 8 → 3, d = 139, n = 200.

Measured, all in this process, on the same exported potential:

1. **Raw gradient rate.** ``jit(vmap(grad U))`` over C = 1, 16, 64, 256 chains, 20
   evaluations per compiled call: chain-gradients per second (the hardware ceiling).
2. **NumPyro NUTS**, 1 chain and 16 vectorized chains, through condpost's NumPyro
   backend (``condpost.infer.numpyro.run_numpyro_mcmc``), or plain NumPyro on the
   exported potential when that backend is not importable.
3. **condpost ChEES-HMC** (``condpost.infer.chees.chees_sample``, the engine of
   ``post.sample("chees", backend="jax")``) at 16, 64 and 256 chains, recording
   ``L_n`` at every draw as the potential's auxiliary output.

For each sampler: wall time of sampling (warmup + draws; compilation reported apart),
chain-gradients/s (all leapfrog steps of all chains, warmup included, over that wall
time), its fraction of the raw rate at the same chain count, and bulk-ESS/s
(``condpost.diagnostics.ess_bulk``) of ``L_n`` and of the slowest coordinate (minimum
bulk ESS over the d coordinates). ESS/s divides by the sampling wall time.

Without a GPU the script says so and runs the small size: the CPU figures check that
everything runs; speed acceptance (issue 7) needs a GPU.

Usage::

    python benchmarks/gpu.py                      # auto size, float32
    python benchmarks/gpu.py --size small --warmup 200 --draws 200
    python benchmarks/gpu.py --out /tmp/gpu.md    # also write the Markdown table
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import condpost as cp  # noqa: E402
from condpost.diagnostics import ess_bulk  # noqa: E402
from condpost.export import to_jax  # noqa: E402
from condpost.infer.chees import chees_sample  # noqa: E402

SIZES = {
    # name: (d_in, hidden, classes, n)
    "small": (4, 8, 3, 200),
    "issue": (16, 64, 10, 2000),
}


# ---------------------------------------------------------------------------- problem
def make_posterior(size: str, seed: int, dtype: torch.dtype):
    """A trained tanh MLP classifier and its local posterior (γ = 1, nβ = n/log n)."""
    d_in, h, k, n = SIZES[size]
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=g)
    teacher = torch.nn.Sequential(torch.nn.Linear(d_in, h), torch.nn.Tanh(), torch.nn.Linear(h, k))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5 / math.sqrt(p.shape[-1]))
        logits = teacher(X)
        Y = torch.distributions.Categorical(logits=logits).sample()
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(d_in, h),
        torch.nn.Tanh(),
        torch.nn.Linear(h, h),
        torch.nn.Tanh(),
        torch.nn.Linear(h, k),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(600):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(X), Y)
        loss.backward()
        opt.step()
    net = net.to(dtype)
    post = cp.LocalPosterior(
        net,
        data=(X.to(dtype), Y),
        likelihood=cp.Categorical(),
        localization=1.0,
        check_center=False,
    )
    return post


# ---------------------------------------------------------------------------- measurements
def _timeit(f, *args, min_time=1.0, min_reps=3):
    jax.block_until_ready(f(*args))  # compile + warm
    reps, t0 = 0, time.perf_counter()
    while True:
        jax.block_until_ready(f(*args))
        reps += 1
        el = time.perf_counter() - t0
        if reps >= min_reps and el >= min_time:
            return el / reps


def raw_gradient_rates(jp, chains_list, dtype, inner=20):
    """Chain-gradients/s of ``vmap(grad U)``, ``inner`` evaluations per compiled call (a
    ``fori_loop``), so per-call dispatch does not count against the hardware rate."""
    grad = jax.grad(jp.potential)
    out = {}
    center = jnp.asarray(jp.center, dtype)
    for C in chains_list:
        g = grad if C == 1 else jax.vmap(grad)
        f = jax.jit(lambda W, g=g: jax.lax.fori_loop(0, inner, lambda i, W: W - 1e-12 * g(W), W))
        W = (
            center
            if C == 1
            else center
            + 1e-3 * jax.random.normal(jax.random.PRNGKey(C), (C, center.shape[0]), dtype)
        )
        out[C] = C * inner / _timeit(f, W)
    return out


def _ess_stats(L, W):
    """bulk ESS of L [C, S] and the minimum over coordinates of W [C, S, d]."""
    e_l = float(ess_bulk(np.asarray(L, dtype=np.float64)))
    e_w = np.asarray(ess_bulk(np.asarray(W, dtype=np.float64)))
    return e_l, float(np.nanmin(e_w))


def run_nuts(post, jp, chains, warmup, draws, seed, use64):
    """NumPyro NUTS through condpost's backend (or plain NumPyro on the export)."""
    try:
        from condpost.infer.numpyro import run_numpyro_mcmc
    except ImportError:  # pragma: no cover - backend not there
        run_numpyro_mcmc = None
    if run_numpyro_mcmc is not None:
        ref = run_numpyro_mcmc(
            post,
            method="nuts",
            chains=chains,
            warmup=warmup,
            draws=draws,
            seed=seed,
            progress=False,
            chain_method="vectorized",
            x64=use64,
        )
        s = ref.settings
        e_l, e_w = _ess_stats(ref.loss(), ref.flat())
        return dict(
            run_s=s["run_time_s"],
            compile_s=s["compile_time_s"],
            grads=s["gradient_evaluations"],
            ess_l=e_l,
            ess_w=e_w,
            divergences=int(ref.diverging.sum()),
            via="condpost NumPyro backend",
        )
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(
        NUTS(potential_fn=jp.potential),
        num_warmup=warmup,
        num_samples=draws,
        num_chains=chains,
        chain_method="vectorized",
        progress_bar=False,
    )
    init = jnp.broadcast_to(jp.center, (chains, jp.d)) if chains > 1 else jp.center
    t0 = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), init_params=init, extra_fields=("num_steps", "diverging"))
    jax.block_until_ready(mcmc.get_samples())
    run_s = time.perf_counter() - t0
    W = np.asarray(mcmc.get_samples(group_by_chain=True))
    L = np.asarray(jax.vmap(jax.vmap(jp.loss))(jnp.asarray(W)))
    ex = mcmc.get_extra_fields(group_by_chain=True)
    e_l, e_w = _ess_stats(L, W)
    return dict(
        run_s=run_s,  # includes compilation (plain NumPyro compiles inside run)
        compile_s=float("nan"),
        grads=int(np.asarray(ex["num_steps"]).sum()) * (warmup + draws) // draws,
        ess_l=e_l,
        ess_w=e_w,
        divergences=int(np.asarray(ex["diverging"]).sum()),
        via="plain NumPyro (grads extrapolated from the draws)",
    )


def run_chees_engine(jp, chains, warmup, draws, seed, dtype, cache):
    w0 = jnp.broadcast_to(jnp.asarray(jp.center, dtype), (chains, jp.d))
    res = chees_sample(
        jp.potential_and_loss,
        w0,
        jax.random.PRNGKey(seed),
        warmup=warmup,
        draws=draws,
        progress=False,
        keep=("w", "aux"),
        cache=cache,
    )
    W = np.swapaxes(res["draws"]["w"], 0, 1)
    L = np.swapaxes(res["draws"]["aux"], 0, 1)
    e_l, e_w = _ess_stats(L, W)
    return dict(
        run_s=res["run_time_s"],
        compile_s=res["compile_time_s"] + res["init_time_s"],
        grads=res["warmup_gradients"] + res["sample_gradients"],
        ess_l=e_l,
        ess_w=e_w,
        divergences=int(res["stats"]["diverging"].sum()),
        step_size=res["adapted"]["step_size"],
        mean_steps=float(res["stats"]["num_steps"][:, 0].mean()),
        padding=res["padding"],
        via="condpost.infer.chees",
    )


# ---------------------------------------------------------------------------- torch SGLD
TORCH_SIZES = {
    # name: (vocab, seq, d_model, blocks, batch, n) ; issue: ≈ 417k parameters, batch 64×32
    "small": (16, 8, 16, 2, 8, 64),
    "issue": (64, 32, 128, 2, 64, 2048),
}


class _Block(torch.nn.Module):
    """Pre-norm causal self-attention + MLP block, written with plain ops (vmap-able)."""

    def __init__(self, dm, heads=4):
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(dm), torch.nn.LayerNorm(dm)
        self.qkv, self.proj = torch.nn.Linear(dm, 3 * dm), torch.nn.Linear(dm, dm)
        self.fc1, self.fc2 = torch.nn.Linear(dm, 4 * dm), torch.nn.Linear(4 * dm, dm)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, -1)
        q, k, v = (t.reshape(B, T, self.h, D // self.h).transpose(1, 2) for t in (q, k, v))
        # explicit causal softmax attention: SDPA has no vmap batching rule on CPU
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D // self.h)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        a = att.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab, seq, dm, blocks):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dm)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(seq, dm))
        self.blocks = torch.nn.Sequential(*[_Block(dm) for _ in range(blocks)])
        self.out = torch.nn.Linear(dm, vocab)

    def forward(self, x):
        return self.out(self.blocks(self.emb(x) + self.pos))


def torch_sgld(size: str, steps: int, compile_: bool):
    """SGLD chain-steps/s on a small transformer LM: eager (1 chain, loop), vmap (16 and
    64 chains) and, with ``compile_``, torch.compile'd vmap (64 chains), through
    ``condpost.infer.sgmcmc.make_kernel``."""
    from condpost.infer.sgmcmc import make_kernel

    vocab, seq, dm, blocks, batch, n = TORCH_SIZES[size]
    torch.manual_seed(0)
    net = _TinyLM(vocab, seq, dm, blocks)
    X = torch.randint(0, vocab, (n, seq))
    Y = torch.roll(X, -1, 1)
    post = cp.LocalPosterior(
        net, data=(X, Y), likelihood=cp.Categorical(), localization=1.0, check_center=False
    )
    rows = []
    configs = [
        ("eager loop", 1, False, False),
        ("vmap", 16, True, False),
        ("vmap", 64, True, False),
    ]
    if compile_:
        configs.append(("vmap + torch.compile", 64, True, True))
    for name, C, vec, comp in configs:
        try:
            k = make_kernel(
                post, "sgld", step_size=1e-6, batch_size=batch, vectorize=vec, compile=comp
            )
            st = k.init(C, 0)
            t0 = time.perf_counter()
            st, _ = k.step(None, st)  # warm-up (and compilation)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(steps):
                st, _ = k.step(None, st)
            sec = time.perf_counter() - t0
            rows.append((name, C, C * steps / sec, first, ""))
        except Exception as e:  # report, do not hide: e.g. compile unavailable
            rows.append((name, C, float("nan"), float("nan"), f"{type(e).__name__}: {e}"[:80]))
    return post.d, rows


# ---------------------------------------------------------------------------- report
def device_report():
    devs = jax.devices()
    gpu = devs[0].platform != "cpu"
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devs})
    import numpyro

    return gpu, {
        "jax devices": f"{len(devs)} × {', '.join(kinds)} ({devs[0].platform})",
        "versions": (
            f"jax {jax.__version__}, numpyro {numpyro.__version__}, torch {torch.__version__}, "
            f"python {platform.python_version()}"
        ),
        "host": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "date": _dt.date.today().isoformat(),
    }


def fmt(x, nd=0):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:,.{nd}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["auto", "small", "issue"], default="auto")
    ap.add_argument("--warmup", type=int, default=None, help="default 300 (small), 500 (issue)")
    ap.add_argument("--draws", type=int, default=None, help="default 300 (small), 500 (issue)")
    ap.add_argument("--chees-chains", default="16,64,256")
    ap.add_argument("--nuts-chains", default="1,16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--x64", action="store_true", help="float64 (default float32)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    ap.add_argument("--torch-steps", type=int, default=20, help="SGLD steps timed (0: skip)")
    ap.add_argument(
        "--torch-compile",
        choices=["auto", "yes", "no"],
        default="auto",
        help="time torch.compile'd SGLD too (auto: only with a CUDA GPU)",
    )
    args = ap.parse_args(argv)

    gpu, info = device_report()
    size = args.size if args.size != "auto" else ("issue" if gpu else "small")
    warmup = args.warmup or (500 if size == "issue" else 300)
    draws = args.draws or (500 if size == "issue" else 300)
    if not gpu:
        print(
            "NOTE: no GPU visible to JAX: running on CPU at size "
            f"'{size}'. These figures check that everything runs; issue 7's speed "
            "acceptance needs a GPU (python benchmarks/gpu.py on a GPU machine).",
            flush=True,
        )
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    tdtype = torch.float64 if args.x64 else torch.float32
    jdtype = jnp.float64 if args.x64 else jnp.float32
    chees_chains = [int(c) for c in args.chees_chains.split(",") if c]
    nuts_chains = [int(c) for c in args.nuts_chains.split(",") if c]

    t0 = time.perf_counter()
    post = make_posterior(size, args.seed, tdtype)
    setup_s = time.perf_counter() - t0
    jp = to_jax(post)
    print(
        f"problem: MLP {SIZES[size][:3]} d={post.d}, n={post.n}, nβ={post.nbeta:.1f}, γ=1; "
        f"setup {setup_s:.1f}s, export {jp.export_seconds:.1f}s",
        flush=True,
    )

    raw = raw_gradient_rates(jp, sorted({1, *chees_chains, *nuts_chains}), jdtype)
    print("raw gradient rate:", {c: round(r) for c, r in raw.items()}, flush=True)

    rows = []
    for C in nuts_chains:
        print(f"NumPyro NUTS, {C} chain(s) ...", flush=True)
        r = run_nuts(post, jp, C, warmup, draws, args.seed, args.x64)
        rows.append(("NumPyro NUTS", C, r))
    cache: dict = {}
    for C in chees_chains:
        print(f"ChEES-HMC, {C} chains ...", flush=True)
        r = run_chees_engine(jp, C, warmup, draws, args.seed, jdtype, cache)
        rows.append(("condpost ChEES-HMC", C, r))

    best_nuts = max((r["ess_l"] / r["run_s"] for n, _, r in rows if "NUTS" in n), default=None)
    lines = [
        f"### GPU-scale sampling ({'GPU' if gpu else 'CPU only: no GPU visible'})",
        "",
        f"- device: {info['jax devices']}; {info['host']}",
        f"- versions: {info['versions']}; {info['date']}",
        f"- problem: tanh MLP {' → '.join(map(str, _arch(size)))} (d = {post.d}), "
        f"n = {post.n}, nβ = n/log n, γ = 1, {'float64' if args.x64 else 'float32'}; "
        f"{warmup} warmup + {draws} draws per chain",
        f"- command: `python benchmarks/gpu.py --size {size} --warmup {warmup} --draws {draws}"
        + (" --x64" if args.x64 else "")
        + "`",
        "",
        "| chains | raw vmapped gradient rate (chain-grads/s) |",
        "|---|---|",
    ]
    lines += [f"| {c} | {fmt(r)} |" for c, r in raw.items()]
    lines += [
        "",
        "| sampler | chains | sampling wall (s) | compile (s) | chain-grads/s | % of raw "
        "| bulk-ESS/s L_n | bulk-ESS/s slowest coord. | ESS/s L_n vs best NUTS | div. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, C, r in rows:
        rate = r["grads"] / r["run_s"]
        e_l, e_w = r["ess_l"] / r["run_s"], r["ess_w"] / r["run_s"]
        rel = f"{e_l / best_nuts:.1f}×" if best_nuts else "–"
        lines.append(
            f"| {name} | {C} | {fmt(r['run_s'], 2)} | {fmt(r['compile_s'], 1)} | {fmt(rate)} "
            f"| {100 * rate / raw[C]:.0f}% | {fmt(e_l, 1)} | {fmt(e_w, 1)} | {rel} "
            f"| {r['divergences']} |"
        )
    notes = sorted({r["via"] for n, _, r in rows if "NUTS" in n})
    lines += [
        "",
        f"NUTS via {', '.join(notes)}; ChEES via `condpost.infer.chees.chees_sample` "
        "(the engine of `post.sample('chees', backend='jax')`). Wall times exclude "
        "compilation; chain-grads/s counts every leapfrog step of every chain, warmup "
        "included. ChEES adapted step sizes / mean leapfrog steps: "
        + ", ".join(
            f"{C}: {r['step_size']:.3g}/{r['mean_steps']:.1f}" for n, C, r in rows if "ChEES" in n
        )
        + ".",
    ]
    if args.torch_steps > 0:
        comp = args.torch_compile == "yes" or (
            args.torch_compile == "auto" and torch.cuda.is_available()
        )
        print("torch SGLD on a small transformer ...", flush=True)
        td, trows = torch_sgld(size, args.torch_steps, comp)
        vocab, seq, dm, blocks, batch, _ = TORCH_SIZES[size]
        lines += [
            "",
            f"SGLD on a {blocks}-block transformer LM (d = {td:,}, vocab {vocab}, d_model {dm}, "
            f"batch {batch}×{seq}), `condpost.infer.sgmcmc.make_kernel`, "
            f"{args.torch_steps} timed steps, torch on "
            f"{'CUDA' if torch.cuda.is_available() else 'CPU'}"
            + ("" if comp else "; torch.compile not timed (pass --torch-compile yes)")
            + ":",
            "",
            "| SGLD | chains | chain-steps/s | first step (s) | note |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {nm} | {C} | {fmt(r, 1)} | {fmt(f1, 2)} | {note} |" for nm, C, r, f1, note in trows
        ]
    report = "\n".join(lines)
    print()
    print(report)
    if args.out:
        args.out.write_text(report + "\n")
        print(f"\nwritten to {args.out}")
    return report


def _arch(size):
    d_in, h, k, _ = SIZES[size]
    return (d_in, h, h, k)


if __name__ == "__main__":
    main()
