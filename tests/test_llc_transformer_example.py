"""``examples/llc_transformer.py --quick`` runs end to end and its printed claims are true.

Ground truth checked against the saved network, independently of the example's code paths:
the data ((a + b) mod p, regenerated here), the training loss and accuracy it claims, the
parameter counts, nβ = n/log n, and that every λ̂ is finite and lies in (0, d/2] (at a
trained ``w*`` the local posterior has E[λ̂] > 0, and in the local quadratic model
λ̂ = ½ Σ_k a_k/(a_k + γ) ≤ d/2, docs/theory.md §4.2).
"""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llc_transformer.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("llc_transformer_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_llc_transformer_quick(tmp_path):
    saved = tmp_path / "net.pt"
    r = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE),
            "--quick",
            "--quiet",
            "--threads",
            "1",
            "--save",
            str(saved),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "it/s" not in r.stderr  # --quiet silences the progress bars

    # --- the trained network is what the example claims
    m = re.search(r"([\d,]+) parameters; data: \(a \+ b\) mod (\d+), n = (\d+)", out)
    n_params, p, n = int(m.group(1).replace(",", "")), int(m.group(2)), int(m.group(3))
    assert n == p * p
    m = re.search(r"L_n\(w\*\) = ([\d.eE+-]+), accuracy ([\d.]+)", out)
    claimed_loss, claimed_acc = float(m.group(1)), float(m.group(2))
    ck = torch.load(saved, weights_only=True)
    cfg = ck["config"]
    net = _load_example().Transformer(cfg["p"], cfg["d_model"], cfg["n_heads"], cfg["d_mlp"])
    net.load_state_dict(ck["state_dict"])
    assert sum(q.numel() for q in net.parameters()) == n_params
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    x = torch.stack([a, b, torch.full_like(a, p)], 1)
    y = (a + b) % p
    with torch.no_grad():
        logits = net(x)
    loss = float(F.cross_entropy(logits, y))
    acc = float((logits.argmax(-1) == y).float().mean())
    assert abs(loss - claimed_loss) <= 1e-5 + 1e-3 * loss  # printed with 6 decimals
    assert abs(acc - claimed_acc) < 1e-4
    assert loss < 0.05 and acc == 1.0  # the task was actually learned

    m = re.search(r"nβ = n/log n = ([\d.]+)", out)
    assert abs(float(m.group(1)) - n / math.log(n)) < 0.06

    # --- the λ̂ table: whole network and one row per head, all finite and in (0, d/2]
    rows = re.findall(r"^(whole network|head \d+ \(\S+\))\s+([\d,]+)\s+(\S+)\s+(\S+)", out, re.M)
    assert [w.split(" (")[0] for w, *_ in rows] == ["whole network"] + [
        f"head {h}" for h in range(cfg["n_heads"])
    ]
    d_head = 4 * cfg["d_model"] * (cfg["d_model"] // cfg["n_heads"])  # q, k, v, o
    for i, (_, d, lam, se) in enumerate(rows):
        d, lam, se = int(d.replace(",", "")), float(lam), float(se)
        assert d == (n_params if i == 0 else d_head)
        assert math.isfinite(lam) and math.isfinite(se) and se > 0
        assert 0 < lam <= d / 2, (i, lam, d)
