"""Per-sample losses recorded along the chains (a recorder of the torch driver).

``post.sample(method, record_losses=..., record_every=k)`` evaluates ``ℓ_i(w)``, the
negative log-likelihood of each sample ``i`` of a query set, at every ``k``-th kept
draw, while the chains run. The draws of a window are evaluated together, batched over
draws and chains (``torch.func.vmap``, else a loop) and chunked over the query set, so
the cost is a few forward passes per window, and the draws themselves need not be kept
(``keep_draws=False``). The values go to a ``[draws', chains, q]`` array at the
network's precision (float32 or float64): in memory, or, with ``store=``, to the file
``losses.bin`` of the run store, written per window, so memory stays bounded by one window whatever the query set and run length.
``condpost.influence`` reads them (``ref.influence()``, ``ref.susceptibility()``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .._batching import batched

__all__ = ["LossRecorder", "query_set", "open_records"]

FILE = "losses.bin"
META = "losses.json"


def query_set(post, query, what: str = "record_losses") -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(x, y, label)`` of a query set: ``None``, ``True`` or ``"train"`` is the training
    data; a pair ``(x, y)`` a query set shaped like it (``what`` names the argument in
    errors)."""
    if query is None or query is True or (isinstance(query, str) and query == "train"):
        post.data.require_memory(f"{what}=True (every training row's loss at every draw)")
        return post.x, post.y, "train"
    if not isinstance(query, (tuple, list)) or len(query) != 2:
        raise TypeError(
            f"{what} must be None/True (the training data) or a pair (x, y) of tensors "
            f"shaped like the data; got {type(query).__name__}"
        )
    from ..constraints import _prepare_probes

    x = _prepare_probes(post, query[0], f"{what} x")
    y = torch.as_tensor(query[1])
    yt = post.data.y_like  # one training row: dtype, device, shape
    if y.is_floating_point():
        y = y.to(dtype=yt.dtype)
    y = y.to(yt.device)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"{what} x has {x.shape[0]} rows but {what} y has {y.shape[0]}")
    if tuple(y.shape[1:]) != tuple(yt.shape[1:]):
        raise ValueError(
            f"{what} y has shape {tuple(y.shape)}; the training targets have shape "
            f"{(post.n, *yt.shape[1:])}"
        )
    return x, y, "custom"


class LossRecorder:
    """``ℓ_i(w)`` of a query set at every ``every``-th kept draw (module doc)."""

    #: the name of its array in ``SampleResult.records`` and of its ``settings["record_…"]``
    kind = "losses"

    def __init__(self, post, query, every: int = 1, *, chunk: int = 4096, what="record_losses"):
        if isinstance(every, bool) or int(every) != every or every < 1:
            raise ValueError(f"record_every must be an integer ≥ 1; got {every!r}")
        self.post, self.every, self.chunk = post, int(every), max(1, int(chunk))
        self.x, self.y, self.label = query_set(post, query, what)
        self.q = int(self.x.shape[0])
        self.dtype = np.float64 if post.dtype == torch.float64 else np.float32
        self.buf: np.ndarray | None = None
        self.path: Path | None = None
        lik, fwd = post.likelihood, post.lifted.forward
        name = type(post.lifted.net).__name__
        self.fns = []
        for a in range(0, self.q, self.chunk):
            xb, yb = self.x[a : a + self.chunk], self.y[a : a + self.chunk]

            def one(w, xb=xb, yb=yb):
                return lik.nll(fwd(w, xb), yb)

            self.fns.append((a, batched(one, f"recorded per-sample losses ({name})")))

    def describe(self) -> dict:
        return {
            "every": self.every,
            "q": self.q,
            "query": self.label,
            "dtype": np.dtype(self.dtype).name,
        }

    def open(self, chains: int, draws: int, store=None) -> None:
        """Allocate ``[⌈draws/every⌉, chains, q]``: in memory, or in the store's file
        (kept from an interrupted run, grown for an extended one)."""
        rows = -(-draws // self.every)
        shape = (rows, chains, self.q)
        if store is None:
            self.buf = np.zeros(shape, dtype=self.dtype)
            return
        self.path = Path(store) / FILE
        meta = {**self.describe(), "chains": chains}
        meta_path = Path(store) / META
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            if {k: old.get(k) for k in meta} != meta:
                raise ValueError(
                    f"resume: the store {str(store)!r} recorded per-sample losses with "
                    f"{old}, now {meta}; resume with the same record_losses/record_every"
                )
        nbytes = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
        with open(self.path, "ab") as fh:  # create; keep what an interrupted run wrote
            pass
        if self.path.stat().st_size < nbytes:
            with open(self.path, "r+b") as fh:
                fh.truncate(nbytes)
        meta_path.write_text(json.dumps(meta))
        self.buf = np.memmap(self.path, dtype=self.dtype, mode="r+", shape=shape)

    def evaluate(self, W: torch.Tensor, draw_chunk: int = 64) -> np.ndarray:
        """``ℓ_i(w)`` ``[K, q]`` for weight vectors ``W`` ``[K, d]`` (no gradient)."""
        out = np.empty((W.shape[0], self.q), dtype=self.dtype)
        with torch.no_grad():
            for s in range(0, W.shape[0], draw_chunk):
                for a, fn in self.fns:
                    v = fn(W[s : s + draw_chunk])  # [k, chunk]
                    out[s : s + v.shape[0], a : a + v.shape[1]] = v.detach().cpu().numpy()
        return out

    def window_draws(self, chains: int) -> int:
        """Kept draws per window: the window's losses stay under 64 MB."""
        per = chains * self.q * np.dtype(self.dtype).itemsize
        return max(1, self.every * ((64 << 20) // max(per, 1)))

    # the driver's recorder protocol
    def shapes(self) -> dict[str, int]:
        return {}

    def select(self, s, state, info):
        return None

    def window(self, S, W, sel) -> dict:
        pos = [i for i, s in enumerate(S) if s % self.every == 0]
        if not pos:
            return {}
        Wm = torch.stack([W[i] for i in pos])  # [J, C, d]
        J, C, d = Wm.shape
        out = self.evaluate(Wm.reshape(J * C, d))
        j0 = S[pos[0]] // self.every
        self.buf[j0 : j0 + J] = out.reshape(J, C, self.q)
        if isinstance(self.buf, np.memmap):
            self.buf.flush()
        return {}

    def result(self, good: int) -> np.ndarray:
        """The recorded losses of the first ``good`` draws, ``[chains, draws', q]``."""
        rows = -(-int(good) // self.every)
        return self.buf[:rows].transpose(1, 0, 2)


def open_records(path, settings: dict, chains: int, done: int) -> dict:
    """The recorded losses of a run store, as a read-only ``[chains, draws', q]`` map."""
    rec = (settings or {}).get("record_losses")
    f = Path(path) / FILE
    if not rec or not f.exists():
        return {}
    every, q = int(rec["every"]), int(rec["q"])
    rows = -(-int(done) // every)
    dt = np.dtype(rec.get("dtype", "float32"))
    if rows == 0 or dt.kind != "f":
        return {}
    mm = np.memmap(f, dtype=dt, mode="r", shape=(rows, chains, q))
    return {"losses": mm.transpose(1, 0, 2)}
