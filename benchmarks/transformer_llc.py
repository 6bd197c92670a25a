"""condpost against devinterp 2.x on a TransformerLens model: speed, per-head LLCs, memory.

Issue 13, part 4. A ``HookedTransformer`` is built from a config and trained briefly in
the script on a synthetic token task (sequences that repeat their first half, so the
second half is predictable by attention: an induction-style task). Then, on the same
weights, data and settings, in one run:

* **condpost**: ``cp.LocalPosterior(model, data=causal_lm_data(ids), likelihood=CausalLM(),
  include=...)`` and ``post.sample("sgld", chains=C, ...)``: all chains vectorized;
* **devinterp 2.0.1**: ``devinterp.slt.sampling.sample`` with ``param_masks`` from
  ``create_param_masks(model, "l{L}h{H}")`` and ``compute_llc``: chains one after another.

Both run SGLD with the same ε, γ, batch size and the same tempered loss. condpost's
``CausalLM`` loss is the mean per *sequence* of the summed per-token NLL; devinterp's is
the mean per *token*; with no padding they differ by the factor T − 1 (predicted tokens
per sequence), so devinterp gets ``n_beta = nβ·(T − 1)`` and both sample the same
posterior and estimate the same λ̂ = nβ·(E[L] − L(w*)). devinterp averages its loss over
every step including burn-in, so both runs use no burn-in (``warmup=0``) and
the same number of draws, and condpost's λ̂ is computed from the same steps.

devinterp estimates ``L_n(w*)`` from ``num_init_loss_batches`` batches (default 32),
shared by every chain: its λ̂ then carries one offset of about ``nβ·SE(L̂(w*))`` that its
per-chain spread does not show. ``--full-init-loss`` gives it the whole dataset instead,
so both estimate the same quantity; condpost's ``L_n(w*)`` is always the full-data value.

Reported per component (the whole model and each head of the weight-refined set):
chain-steps/s (chains × steps / wall time of the sampling call, import excluded), λ̂ ±
its standard error, and the peak resident memory of each sampler's process
(``ru_maxrss``; each sampler runs in a fresh subprocess, devinterp in its own virtual
environment ``benchmarks/.venv/devinterp``, created on first use with
``--system-site-packages`` so it shares this torch).

    python benchmarks/transformer_llc.py                   # CPU size (about 1M weights)
    python benchmarks/transformer_llc.py --quick           # a smoke run
    python benchmarks/transformer_llc.py --gpu             # on a GPU machine, larger model

``--threads`` (default 1) sets torch's intra-op threads in both samplers: on a busy
2-core machine one thread is often faster than two. ``--sequential`` also times condpost
with ``vectorize=False`` (chains one at a time through the one-chain gradient), which is
faster than ``vmap`` when the gradient's arithmetic dominates the step.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".venv" / "devinterp"
DEVINTERP_VERSION = "2.0.1"


# --------------------------------------------------------------------------- the task
def make_tokens(n: int, T: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    half = T // 2
    first = torch.randint(1, vocab, (n, half), generator=g)
    ids = torch.cat([first, first[:, : T - half]], 1)
    return ids


def build_model(cfg: dict, seed: int = 0, device: str = "cpu"):
    import transformer_lens as tl

    c = tl.HookedTransformerConfig(**cfg, act_fn="gelu", device=device, seed=seed)
    return tl.HookedTransformer(c)


def train(model, ids, steps: int, lr: float = 3e-3, batch: int = 64, seed: int = 0) -> float:
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(ids.shape[0], (batch,), generator=g)
        x = ids[idx].to(next(model.parameters()).device)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss)


# --------------------------------------------------------------------------- workers
def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def condpost_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import condpost as cp
    from condpost.models import causal_lm_data, heads

    dev = spec.get("device", "cpu")
    model = build_model(spec["cfg"], device=dev)
    model.load_state_dict(torch.load(spec["state"], weights_only=True, map_location=dev))
    ids = torch.load(spec["ids"], weights_only=True).to(dev)
    x, y = causal_lm_data(ids)
    out = []
    for comp in spec["components"]:
        include = None if comp == "full" else heads(*map(int, comp[1:].split("h")))
        post = cp.LocalPosterior(
            model,
            data=(x, y),
            likelihood=cp.CausalLM(),
            nbeta=spec["nbeta"],
            localization=spec["gamma"],
            include=include,
            check_center=False,
        )
        t0 = time.perf_counter()
        ref = post.sample(
            "sgld",
            chains=spec["chains"],
            warmup=0,
            draws=spec["steps"],
            step_size=spec["eps"],
            batch_size=spec["batch"],
            seed=0,
            keep_draws=False,
            loss="gradient",
            progress=False,
            num_threads=int(spec["threads"]),
            vectorize=spec.get("vectorize", "auto"),
        )
        wall = time.perf_counter() - t0
        lam = ref.llc(warn_user=False)
        out.append(
            {
                "component": comp,
                "d": post.d,
                "wall_s": wall,
                "chain_steps_per_s": spec["chains"] * spec["steps"] / wall,
                "llc": float(lam.mean),
                "llc_se": float(lam.stderr),
            }
        )
    return {"results": out, "peak_mb": _peak_mb()}


def devinterp_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(int(spec["threads"]))
    warnings.simplefilter("ignore")
    from importlib.metadata import version

    from devinterp.slt.llc import compute_llc
    from devinterp.slt.sampling import sample
    from devinterp.slt.weight_restrictions import create_param_masks

    dev = spec.get("device", "cpu")
    model = build_model(spec["cfg"], device=dev)
    model.load_state_dict(torch.load(spec["state"], weights_only=True, map_location=dev))
    ids = torch.load(spec["ids"], weights_only=True)

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return ids.shape[0]

        def __getitem__(self, i):
            return {"input_ids": ids[i]}

    T = ids.shape[1]
    out = []
    for comp in spec["components"]:
        masks = None if comp == "full" else create_param_masks(model, comp)
        path = Path(tempfile.mkdtemp(prefix="devinterp_")) / "samples.zarr"
        t0 = time.perf_counter()
        st = sample(
            model,
            Tokens(),
            {},
            lr=spec["eps"],
            n_beta=spec["nbeta"] * (T - 1),  # per-token loss: see the module doc
            localization=spec["gamma"],
            param_masks=masks,
            num_chains=spec["chains"],
            num_draws=spec["steps"],
            num_burnin_steps=0,
            batch_size=spec["batch"],
            # L_n(w*) from the whole dataset (devinterp's default, 32 batches shared by all
            # chains, adds an offset of about nβ·SE(L̂(w*)) to every chain's λ̂)
            num_init_loss_batches=spec.get("init_batches", 32),
            # True (devinterp's default): every chain sees the same batches, so the data
            # noise of the sampled losses is shared by all chains
            match_sampling_input_ids_across_chains=not spec.get("independent_batches", False),
            init_seed=0,
            output_path=str(path),
            device=dev,
        )
        wall = time.perf_counter() - t0
        res = compute_llc(st)
        per_chain = [float(v) for v in res["llc_per_chain"].values]
        C = len(per_chain)
        sd = float(torch.tensor(per_chain).std()) if C > 1 else float("nan")
        out.append(
            {
                "component": comp,
                "wall_s": wall,
                "chain_steps_per_s": spec["chains"] * spec["steps"] / wall,
                "llc": float(res["llc_mean"]),
                "llc_se": sd / math.sqrt(C),
            }
        )
    return {"results": out, "peak_mb": _peak_mb(), "version": version("devinterp")}


def plain_masked_sgld(model, ids, spec: dict, layer: int, head: int, chains: int = 4) -> dict:
    """An independent check of a per-head λ̂: SGLD written by hand on one head's tensors
    (``W_Q/W_K/W_V/W_O[h]``, ``b_Q/b_K/b_V[h]``), per-token loss, the same ε, γ, nβ per
    token, batch and steps; nβ·(L(w_t) − L(w*)) on a fixed 512-sequence subset (paired
    with w*) at every 5th step, averaged over steps and chains."""
    import torch

    T = ids.shape[1]
    nb_tok, eps, gam = spec["nbeta"] * (T - 1), spec["eps"], spec["gamma"]
    attn = model.blocks[layer].attn
    names = ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"]
    params = {k: getattr(attn, k) for k in names}
    star = {k: p.detach().clone() for k, p in params.items()}
    mask = {k: torch.zeros_like(p) for k, p in params.items()}
    for k in names:
        mask[k][head] = 1

    def tok_loss(x):
        lg = model(x)
        return torch.nn.functional.cross_entropy(
            lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1)
        )

    sub = ids[:512]
    with torch.no_grad():
        l0 = float(tok_loss(sub))
    g = torch.Generator().manual_seed(5)
    per_chain = []
    for _ in range(chains):
        vals = []
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(star[k])
        for t in range(spec["steps"]):
            if t % 5 == 0:
                with torch.no_grad():
                    vals.append(nb_tok * (float(tok_loss(sub)) - l0))
            idx = torch.randint(ids.shape[0], (spec["batch"],), generator=g)
            model.zero_grad()
            tok_loss(ids[idx]).backward()
            with torch.no_grad():
                for k, p in params.items():
                    dw = (nb_tok * p.grad + gam * (p - star[k])) * mask[k]
                    noise = torch.randn(p.shape, generator=g) * mask[k]
                    p.add_(dw, alpha=-0.5 * eps).add_(noise, alpha=eps**0.5)
        per_chain.append(sum(vals) / len(vals))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(star[k])
    m = sum(per_chain) / len(per_chain)
    sd = (sum((v - m) ** 2 for v in per_chain) / (len(per_chain) - 1)) ** 0.5
    return {"llc": m, "llc_se": sd / len(per_chain) ** 0.5, "chains": chains}


def devinterp_python(venv: Path) -> str | None:
    def ok(py):
        r = subprocess.run([py, "-c", "import devinterp.slt.sampling"], capture_output=True)
        return r.returncode == 0

    if ok(sys.executable):
        return sys.executable
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run(
            [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True
        )
    if not ok(str(py)):
        import torch

        pins = [f"devinterp=={DEVINTERP_VERSION}", f"torch=={torch.__version__.split('+')[0]}"]
        print(f"[devinterp] installing {pins} into {venv} (about a minute)")
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *pins], check=False)
    return str(py) if ok(str(py)) else None


def run_worker(python: str, kind: str, spec: dict, tmp: Path) -> dict:
    sp, op = tmp / f"{kind}_spec.json", tmp / f"{kind}_out.json"
    sp.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=str(HERE.parent))
    r = subprocess.run(
        [python, __file__, "--worker", kind, "--spec", str(sp), "--out", str(op)],
        capture_output=True,
        text=True,
        env=env,
    )
    if r.returncode != 0:
        raise RuntimeError(f"{kind} worker failed:\n{r.stderr[-3000:]}")
    return json.loads(op.read_text())


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["condpost", "devinterp"])
    ap.add_argument("--spec")
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--chains", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--heads", type=str, default="l0h0,l0h1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument(
        "--plain",
        action="store_true",
        help="also run a hand-written masked SGLD on the first head (independent check)",
    )
    ap.add_argument(
        "--independent-batches",
        action="store_true",
        help="devinterp chains draw their own batches (default: all chains see the same ones)",
    )
    ap.add_argument(
        "--full-init-loss",
        action="store_true",
        help="devinterp estimates L_n(w*) on the whole dataset (default: its 32 batches)",
    )
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="also time condpost with vectorize=False (chains one at a time)",
    )
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        fn = condpost_worker if args.worker == "condpost" else devinterp_worker
        Path(args.out).write_text(json.dumps(fn(spec)))
        return
    import torch

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit(
            "--gpu: no CUDA device is visible; run it on a GPU machine (the CPU size is the "
            "default)"
        )
    torch.set_num_threads(args.threads)
    if args.gpu:  # about 7M weights
        cfg = dict(n_layers=4, d_model=384, n_heads=6, d_head=64, d_mlp=1536, d_vocab=256, n_ctx=64)
        n, T, train_steps, steps, chains = 16384, 64, 600, args.steps, args.chains
    elif args.quick:
        cfg = dict(n_layers=1, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=48, n_ctx=16)
        n, T, train_steps, steps, chains = 512, 16, 150, 20, 4
    else:
        cfg = dict(n_layers=2, d_model=192, n_heads=6, d_head=32, d_mlp=768, d_vocab=96, n_ctx=24)
        n, T, train_steps, steps, chains = 4096, 24, 400, args.steps, args.chains
    ids = make_tokens(n, T, cfg["d_vocab"], seed=1)
    model = build_model(cfg, device="cuda" if args.gpu else "cpu")
    d_all = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    final = train(model, ids, train_steps)
    print(
        f"HookedTransformer {cfg}: {d_all:,} weights; trained {train_steps} steps in "
        f"{time.perf_counter() - t0:.0f} s, final train loss {final:.3f} nats/token "
        f"(log V = {math.log(cfg['d_vocab']):.2f}; the copied half is predictable)"
    )
    nbeta = n / math.log(n)
    spec = {
        "cfg": cfg,
        "threads": args.threads,
        "chains": chains,
        "steps": steps,
        "eps": 1e-5 if not args.quick else 1e-4,
        "gamma": 100.0,
        "nbeta": nbeta,
        "batch": 8,
        "components": ["full", *[h for h in args.heads.split(",") if h]],
        "init_batches": n // 8 if args.full_init_loss else 32,
        "device": "cuda" if args.gpu else "cpu",
        "independent_batches": bool(args.independent_batches),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.save(model.state_dict(), tmp / "state.pt")
        torch.save(ids, tmp / "ids.pt")
        spec.update(state=str(tmp / "state.pt"), ids=str(tmp / "ids.pt"))
        cp_out = run_worker(sys.executable, "condpost", spec, tmp)
        plain = None
        if args.plain and len(spec["components"]) > 1:
            comp = spec["components"][1]
            layer, head = map(int, comp[1:].split("h"))
            plain = {"component": comp, **plain_masked_sgld(model, ids, spec, layer, head)}
        seq_out = (
            run_worker(sys.executable, "condpost", {**spec, "vectorize": False}, tmp)
            if args.sequential
            else None
        )
        py = devinterp_python(args.venv)
        dv_out = run_worker(py, "devinterp", spec, tmp) if py else None
    print(
        f"SGLD, {chains} chains × {steps} steps (no burn-in), ε = {spec['eps']:g}, γ = "
        f"{spec['gamma']:g}, nβ = n/log n = {nbeta:.1f} per sequence, batch {spec['batch']} "
        f"sequences of {T} tokens, {args.threads} thread(s), "
        f"{torch.cuda.get_device_name(0) if args.gpu else 'CPU'}"
    )
    hdr = (
        f"{'component':10s} {'d':>9s} {'condpost steps/s':>17s} {'devinterp steps/s':>18s} "
        f"{'ratio':>7s} {'condpost λ̂':>16s} {'devinterp λ̂':>16s} {'Δ/SE':>6s}"
    )
    print(hdr)
    rows = []
    for i, c in enumerate(cp_out["results"]):
        dv = dv_out["results"][i] if dv_out else None
        ratio = c["chain_steps_per_s"] / dv["chain_steps_per_s"] if dv else float("nan")
        z = (c["llc"] - dv["llc"]) / math.hypot(c["llc_se"], dv["llc_se"]) if dv else float("nan")
        dvs = f"{dv['chain_steps_per_s']:18.1f}" if dv else f"{'—':>18s}"
        dvl = f"{dv['llc']:9.2f} ± {dv['llc_se']:5.2f}" if dv else f"{'—':>16s}"
        print(
            f"{c['component']:10s} {c['d']:9,d} {c['chain_steps_per_s']:17.1f} {dvs} "
            f"{ratio:6.2f}× {c['llc']:9.2f} ± {c['llc_se']:5.2f} {dvl} {z:6.2f}"
        )
        row = {"condpost": c, "devinterp": dv, "ratio": ratio, "z": z}
        if seq_out:
            sq = seq_out["results"][i]
            r2 = sq["chain_steps_per_s"] / dv["chain_steps_per_s"] if dv else float("nan")
            print(
                f"{'  one chain at a time':21s}{sq['chain_steps_per_s']:16.1f} {'':18s} "
                f"{r2:6.2f}× {sq['llc']:9.2f} ± {sq['llc_se']:5.2f}"
            )
            row["condpost_sequential"] = sq
        rows.append(row)
    if plain is not None:
        print(
            f"hand-written masked SGLD on {plain['component']} ({plain['chains']} chains, same "
            f"steps): λ̂ = {plain['llc']:.2f} ± {plain['llc_se']:.2f}"
        )
    print(
        f"peak RSS: condpost {cp_out['peak_mb']:.0f} MB, devinterp "
        f"{dv_out['peak_mb'] if dv_out else float('nan'):.0f} MB"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": _dt.date.today().isoformat(),
                    "machine": platform.platform(),
                    "spec": {k: v for k, v in spec.items() if k not in ("state", "ids")},
                    "weights": d_all,
                    "rows": rows,
                    "peak_mb": {
                        "condpost": cp_out["peak_mb"],
                        "devinterp": dv_out["peak_mb"] if dv_out else None,
                    },
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
