"""Peak memory of an SGLD + λ̂ run on a token dataset streamed from ``data=``.

The dataset is map-style and computes each row from its index (synthetic token ids
from a generator seeded by the row number), so the tokens never sit in memory: the
declaration reads them in batches (L_n(w*)), SGLD gathers only each minibatch's rows,
and the paired loss estimator's ℓ_i(w*) comes from one more streamed pass. Peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is measured in a fresh subprocess per
configuration, after the run:

* ``streamed`` at 10⁴ and at 10⁶ tokens: acceptance is a peak at 10⁶ within 1.5× of
  the peak at 10⁴ (memory bounded by the batch, not by n);
* ``tensors`` at 10⁶ tokens, the same rows materialised as ``(x, y)`` tensors, for
  contrast: the in-memory declaration evaluates L_n(w*) in one forward pass over all
  rows, whose logits ``[n, T, V]`` grow with n.

Run: ``python benchmarks/streaming_memory.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

T, V, H = 64, 256, 32  # tokens per sequence, vocabulary, width
THREADS = 1


def _child(tokens: int, mode: str) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    import condpost as cp

    torch.set_num_threads(THREADS)

    class SyntheticTokens(Dataset):
        """Row ``i``: ``T`` token ids drawn from a generator seeded with ``i``; the last
        ``i % 8`` positions are padding (attention_mask 0)."""

        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(1_000_003 + int(i))
            ids = torch.randint(V, (T,), generator=g)
            mask = torch.ones(T, dtype=torch.long)
            pad = int(i) % 8
            if pad:
                mask[-pad:] = 0
            return {"input_ids": ids, "attention_mask": mask}

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, H)
            self.mix = nn.Linear(H, H)
            self.out = nn.Linear(H, V)

        def forward(self, ids):
            h = self.emb(ids).cumsum(1) / torch.arange(1, ids.shape[1] + 1).view(1, -1, 1)
            return self.out(torch.tanh(self.mix(h)))

    n = tokens // T
    ds = SyntheticTokens(n)
    if mode == "tensors":
        rows = [ds[i] for i in range(n)]
        data = {
            "input_ids": torch.stack([r["input_ids"] for r in rows]),
            "attention_mask": torch.stack([r["attention_mask"] for r in rows]),
        }
        del rows
    else:
        data = ds
    t0 = time.perf_counter()
    post = cp.LocalPosterior(
        TinyLM(), data, cp.CausalLM(), nbeta=100.0, localization=100.0, check_center=False
    )
    t_decl = time.perf_counter() - t0
    ref = post.sample(
        "sgld",
        chains=2,
        warmup=50,
        draws=100,
        step_size=1e-5,
        batch_size=16,
        seed=0,
        progress=False,
        num_threads=THREADS,
    )
    lam = ref.llc(warn_user=False)
    wall = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {
        "mode": mode,
        "tokens": n * T,
        "sequences": n,
        "peak_rss_mib": peak_kb / 1024,
        "declare_s": t_decl,
        "wall_s": wall,
        "llc": lam.mean,
        "loss_center": post.loss_center,
        "threads": THREADS,
    }


def _run(tokens: int, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(tokens), mode],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", nargs=2, metavar=("TOKENS", "MODE"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(_child(int(a.child[0]), a.child[1])))
        return
    res = [_run(10**4, "streamed"), _run(10**6, "streamed"), _run(10**6, "tensors")]
    print(f"{'mode':>9} {'tokens':>9} {'seqs':>6} {'peak RSS':>10} {'declare':>8} {'total':>7}")
    for r in res:
        print(
            f"{r['mode']:>9} {r['tokens']:>9,} {r['sequences']:>6} "
            f"{r['peak_rss_mib']:>7.0f} MiB {r['declare_s']:>7.1f}s {r['wall_s']:>6.1f}s"
        )
    ratio = res[1]["peak_rss_mib"] / res[0]["peak_rss_mib"]
    print(f"streamed peak at 10^6 / at 10^4 tokens: {ratio:.3f} (acceptance: ≤ 1.5)")
    print(
        f"tensors at 10^6 / streamed at 10^6: "
        f"{res[2]['peak_rss_mib'] / res[1]['peak_rss_mib']:.2f}; L_n(w*) streamed "
        f"{res[1]['loss_center']:.12g} vs in memory {res[2]['loss_center']:.12g}"
    )
    sys.exit(0 if ratio <= 1.5 else 1)


if __name__ == "__main__":
    main()
