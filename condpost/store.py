"""On-disk run store for long SG-MCMC runs: streamed draws, statistics and checkpoints.

A store is a directory (by convention named ``*.cpst``) holding

* ``meta.json`` — format tag, the posterior's configuration, the run's settings and
  the *identity* of the run (everything that determines the draws);
* ``center.npy`` — ``w*``;
* ``draws.bin`` — raw draws in draw-major layout ``[draw, chain, d]`` (so a run can be
  extended by appending), written chunk by chunk with positioned writes (no memory
  map while sampling, so the written pages do not count against the process);
* ``checkpoint.npz`` — the number of completed draws, the sampler state (weights,
  momenta, preconditioner, per-chain random-generator states, step counter) and the
  per-draw statistics. It is replaced atomically (write to a temporary file, fsync,
  ``os.replace``) only *after* the chunk's draws are on disk, so the checkpoint never
  refers to draws that were not written; draws past it are overwritten on resume.

Resuming (``resume=True``) reloads the checkpoint and continues with the same random
streams, so the result equals an uninterrupted run with the same arguments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior
    from .reference import ReferenceClass

__all__ = ["RunStore", "open_store"]

_FORMAT = "condpost.RunStore/1"


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (np.ndarray, torch.Tensor)):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunStore:
    """A run directory being written (see the module docstring). Built by ``open``."""

    def __init__(self, path: Path, meta: dict, stats: dict, done: int, step: int, wall: float):
        self.path = path
        self.meta = meta
        self.stats = stats
        self.done_draws = done
        self.state_step = step
        self.previous_wall = wall
        self._ckpt: dict | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path,
        *,
        post: LocalPosterior,
        identity: dict,
        settings: dict,
        chains: int,
        draws: int,
        keep_draws: bool,
        stat_shapes: dict[str, int],
        resume: bool,
    ) -> RunStore:
        path = Path(path)
        meta_path = path / "meta.json"
        dtype = str(post.center.cpu().numpy().dtype)
        ident = json.loads(json.dumps(identity, default=_json_default))
        if meta_path.exists() and not resume:
            raise FileExistsError(
                f"store={str(path)!r} already holds a run. Pass resume=True to continue it, or "
                f"choose a new path (or delete the directory) to start afresh; condpost never "
                f"silently reuses or overwrites stored draws."
            )
        if resume and not meta_path.exists():
            if path.exists() and any(path.iterdir()):
                raise FileNotFoundError(
                    f"resume=True: {str(path)!r} is not a condpost run store (no meta.json)"
                )
            resume = False  # nothing was written yet: start the run
        if resume:
            meta = json.loads(meta_path.read_text())
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path}: unknown store format {meta.get('format')!r}")
            old = meta["identity"]
            diff = {
                k: (old.get(k), ident.get(k))
                for k in set(old) | set(ident)
                if old.get(k) != ident.get(k)
            }
            if diff:
                rows = "; ".join(
                    f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items())
                )
                raise ValueError(
                    f"resume=True: the arguments differ from the stored run, so the draws would "
                    f"not continue the same chains ({rows}). Use the original arguments (only "
                    f"draws may grow), or a new store path."
                )
            center = np.load(path / "center.npy")
            if not np.array_equal(center, post.center.cpu().numpy()):
                raise ValueError(
                    "resume=True: the posterior's centre w* differs from the stored run's; "
                    "resume with the same network and data"
                )
            ck_path = path / "checkpoint.npz"
            done, step, wall = 0, 0, 0.0
            stats = {k: np.zeros((chains, m)) for k, m in stat_shapes.items()}
            ckpt = None
            if ck_path.exists():
                with np.load(ck_path, allow_pickle=False) as z:
                    ckpt = {k: z[k] for k in z.files}
                done = int(ckpt["done"])
                if done > draws:
                    raise ValueError(
                        f"resume=True with draws={draws}, but the store already holds {done} "
                        f"draws per chain; pass draws ≥ {done}"
                    )
                step, wall = int(ckpt["step"]), float(ckpt["wall"])
                for k, m in stat_shapes.items():
                    old_arr = ckpt.get(f"stat:{k}")
                    if old_arr is not None:
                        k_copy = min(m, old_arr.shape[1])
                        stats[k][:, :k_copy] = old_arr[:, :k_copy]
            meta["settings"] = json.loads(json.dumps(settings, default=_json_default))
            meta["draws"] = draws
            meta["complete"] = False
            store = cls(path, meta, stats, done, step, wall)
            store._ckpt = ckpt
            _atomic_write_bytes(meta_path, lambda fh: fh.write(json.dumps(meta).encode()))
            return store
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": _FORMAT,
            "identity": ident,
            "settings": json.loads(json.dumps(settings, default=_json_default)),
            "config": json.loads(json.dumps(post.config(), default=_json_default)),
            "chains": chains,
            "d": post.d,
            "draws": draws,
            "dtype": dtype,
            "keep_draws": bool(keep_draws),
            "complete": False,
        }
        np.save(path / "center.npy", post.center.cpu().numpy())
        (path / "draws.bin").touch()
        _atomic_write_bytes(meta_path, lambda fh: fh.write(json.dumps(meta).encode()))
        stats = {k: np.zeros((chains, m)) for k, m in stat_shapes.items()}
        return cls(path, meta, stats, 0, 0, 0.0)

    # ------------------------------------------------------------------ state
    def load_state(self, post: LocalPosterior):
        """The sampler state saved with the last checkpoint (None if there is none)."""
        from .infer.sgmcmc import SGMCMCState

        ck = self._ckpt
        if ck is None:
            return None

        def t(name):
            if name not in ck:
                return None
            return torch.as_tensor(ck[name]).to(dtype=post.dtype, device=post.device)

        rng = tuple(torch.as_tensor(r) for r in ck["rng"])
        return SGMCMCState(
            w=t("w"),
            rng=rng,
            step=int(ck["step"]),
            momentum=t("momentum"),
            sq_avg=t("sq_avg"),
            adapt_steps=int(ck["adapt_steps"]),
            adapting=bool(ck["adapting"]),
            thermostat=t("thermostat"),
            batch_keys=(
                tuple(int(v) for v in np.asarray(ck["batch_keys"]).tolist())
                if "batch_keys" in ck
                else None
            ),
        )

    # ------------------------------------------------------------------ writing
    def write_chunk(self, start: int, pending: list[np.ndarray], state, done: int) -> None:
        """Append draws ``start .. done−1`` (``pending``: one ``[C, d]`` array per draw),
        then atomically replace the checkpoint (state + statistics up to ``done``)."""
        if pending:
            block = np.ascontiguousarray(np.stack(pending))  # [k, C, d]
            with open(self.path / "draws.bin", "r+b") as fh:
                fh.seek(start * block[0].nbytes)
                fh.write(block.tobytes())
                fh.flush()
                os.fsync(fh.fileno())
        arrays = {
            "done": np.array(done),
            "step": np.array(state.step),
            "wall": np.array(self.previous_wall),
            "w": state.w.detach().cpu().numpy(),
            "rng": np.stack([r.cpu().numpy() for r in state.rng]),
            "adapt_steps": np.array(state.adapt_steps),
            "adapting": np.array(bool(state.adapting)),
        }
        if getattr(state, "thermostat", None) is not None:
            arrays["thermostat"] = state.thermostat.detach().cpu().numpy()
        if state.batch_keys is not None:
            arrays["batch_keys"] = np.array(state.batch_keys, dtype=np.int64)
        if state.momentum is not None:
            arrays["momentum"] = state.momentum.detach().cpu().numpy()
        if state.sq_avg is not None:
            arrays["sq_avg"] = state.sq_avg.detach().cpu().numpy()
        for k, v in self.stats.items():
            arrays[f"stat:{k}"] = v
        _atomic_write_bytes(self.path / "checkpoint.npz", lambda fh: np.savez(fh, **arrays))
        self.done_draws = done

    def finish(self, settings: dict) -> None:
        self.meta["settings"] = json.loads(json.dumps(settings, default=_json_default))
        self.meta["complete"] = True
        _atomic_write_bytes(
            self.path / "meta.json", lambda fh: fh.write(json.dumps(self.meta).encode())
        )

    def draws_view(self) -> np.ndarray:
        """Read-only memory map of the stored draws as ``[chain, draw, d]``."""
        return _draws_memmap(self.path, self.meta, self.done_draws)


def _draws_memmap(path: Path, meta: dict, done: int) -> np.ndarray | None:
    if not meta.get("keep_draws", True):
        return None
    C, d = int(meta["chains"]), int(meta["d"])
    if done == 0:
        return np.zeros((C, 0, d), dtype=meta["dtype"])
    mm = np.memmap(path / "draws.bin", dtype=meta["dtype"], mode="r", shape=(done, C, d))
    return mm.transpose(1, 0, 2)


def open_store(path, *, posterior: LocalPosterior | None = None) -> ReferenceClass:
    """Open a run store (complete, or interrupted: then the draws up to its checkpoint)
    as a file-backed ``ReferenceClass``. Pass ``posterior`` to enable analyses that need
    the network (activations, predictions)."""
    from .reference import ReferenceClass

    path = Path(path)
    meta_path = path / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{str(path)!r} is not a condpost run store (no meta.json)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown store format {meta.get('format')!r}")
    ck_path = path / "checkpoint.npz"
    if not ck_path.exists():
        raise ValueError(f"{path}: the run wrote no checkpoint yet (no draws to read)")
    with np.load(ck_path, allow_pickle=False) as z:
        done = int(z["done"])
        stats = {}
        for k in z.files:
            if k.startswith("stat:"):
                arr = z[k]
                name = k[len("stat:") :]
                stats[name] = arr
    stats = _trim_stats(stats, done, meta["settings"])
    settings = dict(meta["settings"])
    if not meta.get("complete", False):
        settings["interrupted_at_draw"] = done
    ref = ReferenceClass(
        draws=_draws_memmap(path, meta, done),
        stats=stats,
        center=np.load(path / "center.npy"),
        config=meta["config"],
        settings=settings,
    )
    ref.store = str(path)
    if posterior is not None:
        ref.attach(posterior)
    return ref


def _trim_stats(stats: dict, done: int, settings: dict) -> dict:
    """Cut statistics to the draws actually completed (an interrupted run)."""
    out = {}
    le = int(settings.get("loss_every") or 1)
    fe = settings.get("full_loss_every")
    for k, v in stats.items():
        if k == "loss":
            out[k] = v[:, : -(-done // le)]
        elif k == "loss_full" and fe:
            out[k] = v[:, : -(-done // int(fe))]
        else:
            out[k] = v[:, :done]
    out.setdefault("sampler/diverging", np.zeros((next(iter(out.values())).shape[0], done), bool))
    return out
