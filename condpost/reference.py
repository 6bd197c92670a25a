"""``ReferenceClass``: the draws of a local posterior plus everything needed to reproduce them.

Draws are stored as a flat array ``[chains, draws, d]`` with per-draw statistics
(``L_n``, each constraint's defect, the virial term) and the metadata of the
declaration (nβ, γ, tolerances, seeds, versions). Files are NumPy ``.npz``
archives with a JSON header; loading never unpickles.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._atomic import atomic_write
from ._errors import ConstraintWarning, SamplerWarning, warn
from .infer.base import SampleResult
from .llc import LLC, llc_from_losses

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior

__all__ = ["ReferenceClass", "Summary", "PreservationReport"]

_FORMAT = "condpost.ReferenceClass/1"


def _versions() -> dict[str, str]:
    import pyro

    from ._version import __version__

    return {
        "condpost": __version__,
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _fmt(v: Any, nd: int = 4) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "nan" if np.isnan(v) else str(v)
        return f"{v:.{nd}g}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> str:
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [
        max(len(c), *(len(row[i]) for row in cells)) if cells else len(c)
        for i, c in enumerate(cols)
    ]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))
    out = [line, "-" * len(line)]
    for row in cells:
        out.append("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    return "\n".join(out)


@dataclass
class Summary:
    """Sampler diagnostics with plain-words warnings. ``print(summary)`` shows a table."""

    rows: list[dict]
    divergences: int
    divergences_per_chain: list[int]
    virial_ratio: float
    virial_stderr: float
    chains: int
    draws: int
    method: str
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        cols = ["quantity", "mean", "sd", "mcse", "ess_bulk", "ess_tail", "r_hat"]
        head = (
            f"{self.method.upper()}: {self.chains} chain(s) × {self.draws} draws, "
            f"{self.divergences} divergent transition(s); virial ratio "
            f"E[(w−w*)·∇U]/d = {self.virial_ratio:.4g} ± {self.virial_stderr:.2g} (expect 1)"
        )
        body = _table(self.rows, cols)
        warns = "".join(f"\n  ! {w}" for w in self.warnings) or "\n  no warnings"
        return f"{head}\n{body}\nwarnings:{warns}"

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "divergences": self.divergences,
            "virial_ratio": self.virial_ratio,
            "virial_stderr": self.virial_stderr,
            "warnings": list(self.warnings),
        }


@dataclass
class PreservationReport:
    """One row per constraint: binding ratio, FVU quantiles, coverage, discrete statistics."""

    rows: list[dict]
    warnings: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        cols = [
            "constraint",
            "binding",
            "binding_se",
            "fvu_mean",
            "fvu_q05",
            "fvu_q50",
            "fvu_q95",
            "coverage",
            "defect_mean",
        ]
        for r in self.rows:
            for c in r:
                if c not in cols and (
                    (c.startswith("exact:") and not c.endswith(("q05", "q95")))
                    or c in ("shrinkage", "loss_cost")
                ):
                    cols.append(c)
        warns = "".join(f"\n  ! {w}" for w in self.warnings)
        return _table(self.rows, cols) + warns

    def __getitem__(self, name: str) -> dict:
        for r in self.rows:
            if r["constraint"] == name:
                return r
        raise KeyError(f"no constraint named {name!r}; have {[r['constraint'] for r in self.rows]}")

    def __len__(self) -> int:
        return len(self.rows)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("constraint")


class ReferenceClass:
    """Draws from a (conditioned) tempered local posterior: the reference class of programs.

    Build it with ``LocalPosterior.sample`` or ``SVIResult.sample``; do not
    call the constructor directly.
    """

    def __init__(
        self,
        draws: np.ndarray,
        stats: dict[str, np.ndarray],
        center: np.ndarray,
        config: dict,
        settings: dict,
        versions: dict | None = None,
        posterior: LocalPosterior | None = None,
        created: str | None = None,
    ) -> None:
        self._draws = draws
        self._stats = stats
        self.center = center
        self.config = config
        self.settings = settings
        self.versions = versions or _versions()
        self.posterior = posterior
        self.created = created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_result(cls, post: LocalPosterior, result: SampleResult) -> ReferenceClass:
        """Build from an executor's ``SampleResult``, computing only the missing statistics.

        ``L_n``, the virial term ``(w − w*)·∇U`` and each constraint's defect are taken
        from ``result.stats`` when the sampler measured them (ChEES, NumPyro and SG-MCMC
        do) and evaluated here, in torch, only when absent. Draws after a non-finite one
        are cut: every chain keeps the draws before the first non-finite draw of any
        chain, and ``settings["fault"]`` says where it happened.
        """
        settings = dict(result.settings)
        stats = {k: np.asarray(v) for k, v in result.stats.items()}
        draws = result.draws
        if result.fault:
            settings["fault"] = result.fault
        if draws is None:
            ref = cls.from_stats(post, None, stats, settings=settings, store=result.store)
            ref.records = dict(result.records)
            return ref
        if isinstance(draws, torch.Tensor):
            draws = draws.detach().cpu().numpy()
        C, S, d = draws.shape
        if not isinstance(draws, np.memmap) and S:
            finite = np.isfinite(draws).all(-1)  # [C, S]
            if not finite.all():
                bad = np.argwhere(~finite)  # rows (chain, draw)
                c_bad, s_bad = bad[np.argmin(bad[:, 1])]
                keep = int(s_bad)
                msg = (
                    f"non-finite weights at chain {int(c_bad)}, draw {keep}: the sampler "
                    f"diverged. Lower the step size or raise target_accept."
                )
                if keep == 0:
                    raise FloatingPointError(msg + " No finite draw was completed before it.")
                warn(
                    f"{msg} The {keep} draw(s) per chain before it are kept (ref.settings"
                    f"['fault']); later draws are dropped.",
                    SamplerWarning,
                )
                settings["fault"] = msg
                settings["draws_requested"] = settings.get("draws", S)
                settings["draws"] = keep
                draws = draws[:, :keep]
                stats = {
                    k: v[:, :keep] if v.ndim >= 2 and v.shape[1] == S else v
                    for k, v in stats.items()
                }
                S = keep
        names = [f"defect/{b.name}" for b in post.constraints]
        need_loss = "loss" not in stats
        need_virial = "virial" not in stats
        need_defects = any(nm not in stats for nm in names)
        if need_loss or need_virial or need_defects:
            flat = torch.as_tensor(np.ascontiguousarray(draws).reshape(C * S, d))
            ev = post.evaluate(flat, grad=need_virial, loss=need_loss, defects=need_defects)
            for k, v in ev.items():
                stats.setdefault(k, v.reshape(C, S).cpu().numpy())
        stats.setdefault("sampler/diverging", np.zeros((C, S), dtype=bool))
        ref = cls._build(post, draws, stats, settings, result.store)
        if result.records:
            ref.records = {
                k: v[:, : -(-S // _record_every(settings))] for k, v in result.records.items()
            }
        return ref

    @classmethod
    def _build(cls, post, draws, stats, settings, store) -> ReferenceClass:
        ref = cls(
            draws=draws,
            stats=stats,
            center=post.center.detach().cpu().numpy(),
            config=post.config(),
            settings=settings,
            posterior=post,
        )
        ref.store = store
        return ref

    @classmethod
    def from_draws(
        cls,
        post: LocalPosterior,
        W: torch.Tensor,
        *,
        settings: dict,
        sample_stats: dict | None = None,
    ) -> ReferenceClass:
        """Build from draws ``[chains, draws, d]``, evaluating every statistic in torch."""
        stats = {f"sampler/{k}": np.asarray(v) for k, v in (sample_stats or {}).items()}
        return cls.from_result(post, SampleResult(draws=W, stats=stats, settings=settings))

    @classmethod
    def from_pyro(cls, mcmc, post: LocalPosterior, *, name: str | None = None) -> ReferenceClass:
        """Build from a ``pyro.infer.MCMC`` run of a model written with ``cp.lift``.

        The draws are read with ``mcmc.get_samples(group_by_chain=True)``: the sites
        ``"<name>.<param>"`` made by ``cp.lift(name, net, ...)`` must be exactly the
        parameters ``post`` lifts (``name`` is found from the site names when not given).
        ``L_n``, each constraint's defect and the virial term are evaluated in torch, as
        for any other sampler, and divergent transitions (from ``mcmc.diagnostics()``)
        are flagged. When the kernel's potential is available, it is compared with
        ``post.potential`` at two draws: if the two differ by more than a constant, the
        MCMC ran another posterior and ``ValueError`` says so.

        Parameters
        ----------
        mcmc : pyro.infer.MCMC
            A finished run (``mcmc.run()`` called).
        post : LocalPosterior
            The declaration the model implements (same network, data, likelihood, nβ, γ,
            lifted weights and constraints).
        name : str, optional
            The ``name`` given to ``cp.lift`` (default: inferred, e.g. ``"net"``).
        """
        try:
            samples = mcmc.get_samples(group_by_chain=True)
        except AttributeError:
            raise TypeError(
                f"from_pyro needs a pyro.infer.MCMC run; got {type(mcmc).__name__}"
            ) from None
        if not samples:
            raise ValueError("from_pyro: the MCMC run has no samples; call mcmc.run() first")
        lifted = list(post.lifted.names)
        keys = list(samples)
        if name is None:
            prefixes = {k[: -len(p) - 1] for k in keys for p in lifted if k.endswith("." + p)}
            prefixes = {pf for pf in prefixes if all(f"{pf}.{p}" in samples for p in lifted)}
            if len(prefixes) != 1:
                raise ValueError(
                    f"from_pyro: cannot tell which sites hold the lifted weights {lifted[:4]}"
                    f"{'...' if len(lifted) > 4 else ''} among the MCMC sites {keys[:8]}: "
                    + (
                        f"several prefixes fit ({sorted(prefixes)}); pass name=..."
                        if prefixes
                        else "none has every lifted parameter. The model must call "
                        "cp.lift(name, net, ...) with the same include/exclude as the "
                        "declaration (pass name= if it is not found)."
                    )
                )
            name = prefixes.pop()
        mine = [k for k in keys if k.startswith(name + ".")]
        missing = [p for p in lifted if f"{name}.{p}" not in samples]
        extra = [k for k in mine if k[len(name) + 1 :] not in lifted]
        if missing or extra:
            raise ValueError(
                f"from_pyro: the MCMC sites of cp.lift({name!r}, ...) do not match the "
                f"parameters the declaration lifts: missing {missing[:6]}, not lifted by the "
                f"declaration {extra[:6]}. Use the same include/exclude in cp.lift and in "
                f"LocalPosterior."
            )
        parts = []
        C = S = None
        for p, shp in zip(lifted, post.lifted.shapes, strict=True):
            v = torch.as_tensor(samples[f"{name}.{p}"])
            if v.dim() < 2 + len(shp) or tuple(v.shape[v.dim() - len(shp) :]) != tuple(shp):
                raise ValueError(
                    f"from_pyro: site {name}.{p} has draws of shape {tuple(v.shape)}; "
                    f"expected [chains, draws, {', '.join(map(str, shp))}]"
                )
            C, S = int(v.shape[0]), int(v.shape[1])
            parts.append(v.reshape(C, S, -1).to(dtype=post.dtype, device=post.device))
        W = torch.cat(parts, -1).detach()
        others = [k for k in keys if k not in mine]
        _check_pyro_potential(mcmc, post, W, name, samples, others)
        div = np.zeros((C, S), dtype=bool)
        try:
            diag = mcmc.diagnostics().get("divergences", {})
            for c, idx in enumerate(diag.values()):
                idx = [int(i) for i in idx if 0 <= int(i) < S]
                if c < C and idx:
                    div[c, idx] = True
        except Exception:  # noqa: BLE001 - divergences are optional information
            pass
        kernel = getattr(mcmc, "kernel", None)
        settings = {
            "method": f"pyro-mcmc:{type(kernel).__name__.lower()}" if kernel else "pyro-mcmc",
            "backend": "pyro",
            "chains": C,
            "draws": S,
            "warmup": int(getattr(mcmc, "warmup_steps", 0) or 0),
            "source": "ReferenceClass.from_pyro",
            "lift_name": name,
        }
        if others:
            settings["other_sites"] = others
        return cls.from_draws(post, W, settings=settings, sample_stats={"diverging": div})

    @classmethod
    def from_stats(
        cls,
        post: LocalPosterior,
        draws: np.ndarray | None,
        stats: dict[str, np.ndarray],
        *,
        settings: dict,
        store: str | None = None,
    ) -> ReferenceClass:
        """Build from per-draw statistics measured by the sampler (SG-MCMC).

        ``draws`` is ``[chains, draws, d]`` (a NumPy array or a read-only memory map of a
        run store), or None when the weights were not kept. ``stats`` holds ``loss``
        (the sampler's ``L_n`` estimate per measured draw), ``virial`` and any other
        ``[chains, ·]`` arrays; nothing is re-evaluated here.
        """
        stats = dict(stats)
        C = next(iter(stats.values())).shape[0]
        S = int(settings.get("draws", stats["virial"].shape[1]))
        stats.setdefault("sampler/diverging", np.zeros((C, S), dtype=bool))
        return cls._build(post, draws, stats, settings, store)

    store: str | None = None
    #: arrays recorded along the chains: ``"losses"`` ``[chains, draws', q]`` (per-sample
    #: losses of ``record_losses=``; ``settings["record_losses"]`` says of what and how thinned)
    records: dict = {}

    # ------------------------------------------------------------------ basic access
    @property
    def chains(self) -> int:
        if self._draws is None:
            return int(self._stats["virial"].shape[0])
        return int(self._draws.shape[0])

    @property
    def num_draws(self) -> int:
        if self._draws is None:
            return int(self._stats["virial"].shape[1])
        return int(self._draws.shape[1])

    @property
    def d(self) -> int:
        if self._draws is None:
            return int(self.config["d"])
        return int(self._draws.shape[2])

    def _need_draws(self, what: str) -> np.ndarray:
        if self._draws is None:
            raise RuntimeError(
                f"{what} needs the weights of the draws, but this run kept only per-draw "
                f"statistics (keep_draws=False). Sample again with keep_draws=True (with "
                f"store=... for large networks)."
            )
        return self._draws

    @property
    def nbeta(self) -> float:
        return float(self.config["nbeta"])

    @property
    def localization(self) -> float:
        return float(self.config["localization"])

    @property
    def diverging(self) -> np.ndarray:
        """Boolean ``[chain, draw]``: draws that ended a divergent trajectory (kept, flagged)."""
        return self._stats["sampler/diverging"].astype(bool)

    def flat(self) -> np.ndarray:
        """All draws as ``[chain, draw, d]`` in the lifted-vector layout."""
        return self._need_draws("flat()")

    def weights(self) -> dict[str, np.ndarray]:
        """Lifted parameters by name, each ``[chain, draw, *shape]``."""
        draws = self._need_draws("weights()")
        names = self.config["lifted"]["names"]
        shapes = self.config["lifted"]["shapes"]
        out, off = {}, 0
        for nm, shp in zip(names, shapes, strict=True):
            k = int(np.prod(shp)) if shp else 1
            out[nm] = draws[:, :, off : off + k].reshape(self.chains, self.num_draws, *shp)
            off += k
        return out

    def loss(self) -> np.ndarray:
        """``L_n`` at every draw, ``[chain, draw]``."""
        return self._stats["loss"]

    def defects(self) -> dict[str, np.ndarray]:
        """``D_c`` at every draw, ``[chain, draw]``, by constraint name."""
        return {k[len("defect/") :]: v for k, v in self._stats.items() if k.startswith("defect/")}

    def stat(self, key: str) -> np.ndarray:
        return self._stats[key]

    def __repr__(self) -> str:
        return (
            f"ReferenceClass({self.settings.get('method', '?')}, chains={self.chains}, "
            f"draws={self.num_draws}, d={self.d}, nbeta={self.nbeta:.4g}, "
            f"localization={self.localization:g}, constraints="
            f"{[c['name'] for c in self.config['constraints']]})"
        )

    # ------------------------------------------------------------------ network outputs
    def _need_posterior(self, what: str) -> LocalPosterior:
        if self.posterior is None:
            raise RuntimeError(
                f"{what} needs the network: this ReferenceClass was loaded from disk. Use "
                f"ReferenceClass.load(path, posterior=post) or ref.attach(post)."
            )
        return self.posterior

    def attach(self, post: LocalPosterior) -> ReferenceClass:
        """Attach the declaration (network, data) that produced these draws.

        ``post`` must be that declaration: its fingerprint (``post.fingerprint()``: data,
        likelihood, architecture, lifted weights, centre, nβ, γ, constraints) must match
        the one recorded with the draws, else ``ValueError`` lists what differs. Draws
        recorded without a fingerprint (older files) get a warning instead.
        """
        from ._errors import CondpostWarning
        from .fingerprint import compare

        where = self.store or getattr(self, "_source", None)
        where = f"{str(where)!r}" if where else "these draws"
        if post.d != self.d or list(post.lifted.names) != list(self.config["lifted"]["names"]):
            raise ValueError(
                f"the posterior lifts {post.d} weights ({post.lifted.names[:4]}...) but {where} "
                f"have d={self.d} ({self.config['lifted']['names'][:4]}...)"
            )
        stored, current = self.config.get("fingerprint"), post.fingerprint()
        if not isinstance(stored, dict) or not stored:
            warn(
                f"{where} were recorded without a declaration fingerprint (by an older "
                f"condpost): condpost cannot check that this posterior is the declaration "
                f"that produced them",
                CondpostWarning,
            )
        elif stored.get("version") != current.get("version"):
            warn(
                f"{where} carry a declaration fingerprint of version {stored.get('version')!r} "
                f"(now {current.get('version')!r}): condpost cannot check that this posterior "
                f"is the declaration that produced them",
                CondpostWarning,
            )
        else:
            diffs = compare(stored, current)
            if diffs:
                raise ValueError(
                    f"{where} were produced by another declaration; differences: "
                    f"{'; '.join(diffs)}. Analyses with this posterior would mix two different "
                    f"posteriors: use the original declaration (network, data, likelihood, "
                    f"constraints), or a new store path / file for draws of this one."
                )
        self.posterior = post
        return self

    def _map_draws(self, fn, chunk: int = 128, max_draws: int | None = None):
        post = self._need_posterior("this")
        draws = self._need_draws("this analysis")
        W = torch.as_tensor(
            np.asarray(draws).reshape(-1, self.d), dtype=post.dtype, device=post.device
        )
        if max_draws is not None and W.shape[0] > max_draws:
            idx = torch.linspace(0, W.shape[0] - 1, max_draws).round().long()
            W = W[idx]
        from ._batching import batched

        bfn = batched(fn, f"activations ({type(post.lifted.net).__name__})")
        with torch.no_grad():
            outs = [bfn(W[i : i + chunk]) for i in range(0, W.shape[0], chunk)]
        if isinstance(outs[0], dict):
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
        return torch.cat(outs)

    def activations(self, probes, sites, *, max_draws: int | None = None):
        """Activations at ``sites`` on ``probes`` for every draw.

        Returns a dict ``site → tensor [chain·draw, m, ...]`` (a tensor if ``sites`` is
        a single string).
        """
        from .constraints import _prepare_probes
        from .lifting import resolve_sites

        post = self._need_posterior("activations()")
        single = isinstance(sites, str)
        sites = resolve_sites(post.lifted.net, sites, argname="sites")
        p = _prepare_probes(post, probes, "probes")

        def fn(w):
            _, acts = post.lifted.call(post.lifted.unflatten(w), p, sites)
            return {s: acts[s] for s in sites}

        out = self._map_draws(fn, max_draws=max_draws)
        return out[sites[0]] if single else out

    def predict(self, x, *, max_draws: int | None = None) -> torch.Tensor:
        """Network outputs on ``x`` for every draw, ``[chain·draw, m, ...]``."""
        from .constraints import _prepare_probes

        post = self._need_posterior("predict()")
        p = _prepare_probes(post, x, "x")
        return self._map_draws(lambda w: post.lifted.forward(w, p), max_draws=max_draws)

    # ------------------------------------------------------------------ diagnostics
    def summary(self, *, warn_user: bool = True, weights: bool | None = None) -> Summary:
        """R-hat, bulk/tail ESS, divergences and the virial check (docs/theory.md §5.2).

        Rows: ``L_n``, each constraint's defect, and per lifted parameter tensor the
        worst coordinate (max R-hat, min ESS). Problems are listed in plain words and,
        with ``warn_user``, emitted as ``SamplerWarning``. ``weights=False`` skips the
        per-parameter rows (default: skipped when the draws were not kept or are read
        from a run store with more than 10⁸ numbers).
        """
        from .diagnostics import ess_bulk, ess_tail, mcse_mean, split_rhat, virial_ratio

        rows = []

        def scalar_row(name, x):
            return {
                "quantity": name,
                "mean": float(x.mean()),
                "sd": float(x.std()),
                "mcse": float(mcse_mean(x)),
                "ess_bulk": float(ess_bulk(x)),
                "ess_tail": float(ess_tail(x)),
                "r_hat": float(split_rhat(x)),
            }

        rows.append(scalar_row("L_n", self.loss()))
        for nm, v in self.defects().items():
            rows.append(scalar_row(f"D[{nm}]", v))
        if weights is None:
            weights = self._draws is not None and (
                not isinstance(self._draws, np.memmap)
                or self.chains * self.num_draws * self.d <= 10**8
            )
        for nm, arr in (self.weights() if weights else {}).items():
            x = arr.reshape(self.chains, self.num_draws, -1)
            rh, eb, et = split_rhat(x), ess_bulk(x), ess_tail(x)
            rows.append(
                {
                    "quantity": f"{nm} (worst of {x.shape[-1]})",
                    "mean": float(np.abs(x.mean((0, 1))).max()),
                    "sd": float(x.std((0, 1)).max()),
                    "mcse": _safe(np.max, mcse_mean(x)),
                    "ess_bulk": _safe(np.min, eb),
                    "ess_tail": _safe(np.min, et),
                    "r_hat": _safe(np.max, rh),
                }
            )
        vir = virial_ratio(self._stats["virial"], self.d)
        div = self.diverging
        msgs = []
        method = self.settings.get("method", "?")
        if div.sum():
            msgs.append(
                f"{int(div.sum())} divergent transition(s) after warmup: the sampler hit regions "
                f"it cannot integrate (tight tolerances or strong curvature). Raise target_accept, "
                f"lengthen warmup, loosen tolerances or increase localization."
            )
        worst_rhat = max((r["r_hat"] for r in rows if not np.isnan(r["r_hat"])), default=1.0)
        stuck = (
            [c for c in range(self.chains) if np.all(self._draws[c] == self._draws[c, :1])]
            if weights
            else []
        )
        if stuck:
            msgs.append(
                f"chain(s) {stuck} never moved: every proposal was rejected. The step size is far "
                f"too large or the target is degenerate; let the step size adapt (longer warmup)."
            )
        if self.chains > 1 and worst_rhat > 1.01:
            msgs.append(
                f"R-hat up to {worst_rhat:.3f} > 1.01: the chains disagree, so they have not "
                f"mixed. Run longer warmup/draws, or check for multimodality (weak localization)."
            )
        low = [r for r in rows if np.isfinite(r["ess_bulk"]) and r["ess_bulk"] < 400]
        if low:
            msgs.append(
                f"bulk ESS below 400 for {[r['quantity'] for r in low][:4]} (min "
                f"{min(r['ess_bulk'] for r in low):.0f}): too few effective draws for reliable "
                f"means; draw more."
            )
        if (
            np.isfinite(vir.stderr)
            and abs(vir.ratio - 1) > 4 * vir.stderr
            and abs(vir.ratio - 1) > 0.05
        ):
            msgs.append(
                f"virial ratio {vir.ratio:.3f} ± {vir.stderr:.2g} differs from 1: the draws do "
                f"not follow the target e^(−U) (sampler bias: step size too large, minibatch noise, "
                f"or not yet stationary)."
            )
        if method == "svi":
            msgs.append(
                "these are draws from a Gaussian variational fit, not MCMC: it under-disperses "
                "on singular posteriors; do not report LLC or MI without an MCMC cross-check."
            )
        if warn_user:
            for m in msgs:
                warn(m, SamplerWarning)
        return Summary(
            rows=rows,
            divergences=int(div.sum()),
            divergences_per_chain=div.sum(1).astype(int).tolist(),
            virial_ratio=float(vir.ratio),
            virial_stderr=float(vir.stderr),
            chains=self.chains,
            draws=self.num_draws,
            method=method,
            warnings=msgs,
        )

    def llc(self, *, warn_user: bool = True, estimator: str | None = None) -> LLC:
        """``λ̂ = nβ (E[L_n] − L_n(w*))`` with mean, std over chains and MC standard error.

        Warns when λ̂ is negative (w* is not a local minimum; docs/theory.md §4.2's gap
        formula). With constraints it is the constrained loss part ``λ̂_{L|C}``.

        For SG-MCMC runs the per-draw ``L_n`` is the sampler's estimator (see
        ``settings["loss_estimator"]``; ``estimator="full"`` uses the full-data losses
        recorded with ``full_loss_every``), the baseline's standard error (if it was
        estimated from batches) is added to the reported one, and the run's diagnostics
        (loss trace below ``L_n(w*)``, drift, chains' disagreement, localization
        dominance) are attached as notes and warned about in plain words.
        """
        if self.settings.get("backend") == "torch" and self.settings.get("method") in (
            "sgld",
            "rmsprop_sgld",
            "sghmc",
            "sgnht",
        ):
            from .llc import llc_sgmcmc

            return llc_sgmcmc(self, estimator=estimator, warn_user=warn_user)
        return llc_from_losses(
            self.loss(),
            self.config["loss_center"],
            self.nbeta,
            self.localization,
            self.config["n"],
            self.d,
            constrained=bool(self.config["constraints"]),
            method=self.settings.get("method", "?"),
            warn_negative=warn_user,
        )

    def preservation(
        self, unconstrained: ReferenceClass | None = None, *, warn_user: bool = True
    ) -> PreservationReport:
        """How well each constraint holds across the reference class (docs/theory.md §3.2).

        Columns, one row per constraint:

        * ``binding`` ``b_c = 2E[ρ_c D_c]/k_c`` with its MC standard error (exact for
          Gaussian defects; for hinge² and CKA defects the same ratio of mean defect to
          tolerance; not defined for KL and Bernoulli defects);
        * ``fvu_mean`` and ``fvu_q05/q50/q95``: ``k_c D_c`` over the feature's spread
          across probes at ``w*`` (vector features);
        * ``coverage`` ``P(D_c ≤ τ_c)`` with ``τ_c = k_c/(2ρ_c)`` (= σ² in tolerance mode:
          RMS deviation within the tolerance);
        * ``exact:<stat>``: the mean of the exact discrete statistic behind a surrogate
          (fraction active, true zero count, numerical rank, fraction on the grid), with
          its 5% and 95% quantiles over draws in ``exact:<stat>:q05`` / ``exact:<stat>:q95``;
        * with a paired ``unconstrained`` run (same network, no constraint): ``shrinkage``
          ``E_C[D_c]/E_0[D_c]`` and ``loss_cost`` ``Δ_c = E_C[L_n] − E_0[L_n]``.
        """
        from .diagnostics import mcse_mean

        rows, msgs = [], []
        defects = self.defects()
        D0 = None
        if unconstrained is not None:
            post = self._need_posterior("preservation(unconstrained=...)")
            W0 = torch.as_tensor(unconstrained.flat().reshape(-1, self.d), dtype=post.dtype)
            ev0 = post.evaluate(W0, grad=False)
            D0 = {k[len("defect/") :]: v.numpy() for k, v in ev0.items() if k.startswith("defect/")}
            L0 = unconstrained.loss()
        for cfg in self.config["constraints"]:
            nm = cfg["name"]
            D = defects[nm]
            k, rho = cfg["k"], cfg["rho"]
            tau = k / (2 * rho)
            row: dict[str, Any] = {
                "constraint": nm,
                "kind": cfg["kind"],
                "family": cfg["family"],
                "k": k,
                "rho": rho,
                "tolerance": cfg.get("tolerance"),
                "strength": cfg.get("strength"),
            }
            row["defect_mean"] = float(D.mean())
            if cfg["family"] in ("gaussian", "hinge", "cka", "grid"):
                b = 2 * rho * D / k
                row["binding"] = float(b.mean())
                try:
                    row["binding_se"] = float(mcse_mean(b))
                except ValueError:
                    row["binding_se"] = float("nan")
            spread = cfg.get("spread")
            if spread and spread > 0 and cfg["family"] == "gaussian":
                fvu = k * D / spread
                q = np.quantile(fvu, [0.05, 0.5, 0.95])
                row.update(fvu_mean=float(fvu.mean()), fvu_q05=q[0], fvu_q50=q[1], fvu_q95=q[2])
            row["coverage"] = float((D <= tau).mean())
            for key in cfg.get("exact", []):
                v = self._stats.get(f"exact/{nm}/{key}")
                if v is not None:
                    row[f"exact:{key}"] = float(v.mean())
                    row[f"exact:{key}:q05"], row[f"exact:{key}:q95"] = np.quantile(v, [0.05, 0.95])
            if cfg.get("num_zero") is not None:
                row["num_zero"] = cfg["num_zero"]
            if D0 is not None:
                row["shrinkage"] = (
                    float(D.mean() / D0[nm].mean()) if D0[nm].mean() > 0 else float("nan")
                )
                row["loss_cost"] = float(self.loss().mean() - L0.mean())
            b = row.get("binding")
            if b is not None and b < 0.05:
                msgs.append(
                    f"{nm}: binding ratio {b:.3f} < 0.05 — this constraint changes nothing at this "
                    f"tolerance (the loss already pins the feature more tightly)."
                )
            elif (
                b is not None
                and cfg["family"] == "gaussian"
                and b - 3 * np.nan_to_num(row.get("binding_se", 0.0)) > 1
            ):
                msgs.append(
                    f"{nm}: binding ratio {b:.3f} ± {row['binding_se']:.2g} is above 1, which "
                    f"the posterior cannot give for a feature linear near w* (b ∈ [0, 1]): the "
                    f"draws are not from it (SG-MCMC step too large, or chains not yet "
                    f"equilibrated: see the virial ratio) or the feature is strongly nonlinear "
                    f"at this tolerance. Check with a smaller step or an exact sampler."
                )
            elif b is not None and b > 0.95:
                msgs.append(
                    f"{nm}: binding ratio {b:.3f} > 0.95 — this constraint, not the loss, sets the "
                    f"spread of the feature."
                )
            rows.append(row)
        if warn_user:
            for m in msgs:
                warn(m, ConstraintWarning)
        return PreservationReport(rows, msgs)

    # ------------------------------------------------------------------ export
    def to_arviz(self, *, log_likelihood: bool | str = "auto", max_values: int = 10_000_000):
        """An ``arviz.InferenceData`` with the weights, ``L_n``, defects and divergences.

        Groups:

        * ``posterior``: the lifted parameters by name, ``[chain, draw, *shape]``;
        * ``sample_stats``: ``diverging``, ``loss`` (``L_n``), ``virial`` and one
          ``defect[<name>]`` per constraint (``D_c`` at each draw);
        * ``log_likelihood`` (variable ``"y"``, ``[chain, draw, n]``): the per-sample
          log-likelihood ``−ℓ_i(w)`` of each training sample at each draw, so that
          ``az.loo(idata)`` and ``az.waic(idata)`` run. It is computed in torch through
          the one batching helper (``condpost._batching.batched``), a chunk of draws at a
          time, and needs the declaration attached and the draws kept.

        ``log_likelihood="auto"`` (default) adds the group when the likelihood is a
        normalized density (``Categorical``, ``Gaussian``, ``Bernoulli``), the declaration
        is attached, the draws were kept and ``chains·draws·n ≤ max_values``; ``True``
        requires it (an error says what is missing; a ``CustomNLL`` is then taken as a
        normalized negative log density); ``False`` skips it.

        Note that the draws come from the *tempered*, localized (and conditioned)
        posterior: LOO and WAIC computed from them describe the predictive of that
        reference class, not of the Bayesian posterior at β = 1.
        """
        import arviz as az

        posterior = dict(self.weights())
        stats = {"diverging": self.diverging, "loss": self.loss()}
        if "virial" in self._stats:
            stats["virial"] = self._stats["virial"]
        for nm, v in self.defects().items():
            stats[f"defect[{nm}]"] = v
        attrs = {
            "nbeta": self.nbeta,
            "localization": self.localization,
            "condpost_metadata": json.dumps(self._metadata(), default=_json_default),
        }
        groups: dict[str, Any] = {"posterior": posterior, "sample_stats": stats}
        ll = self._log_likelihood_values(log_likelihood, max_values)
        if ll is not None:
            groups["log_likelihood"] = {"y": ll}
            groups["dims"] = {"y": ["obs"]}
        idata = az.from_dict(**groups, attrs=attrs)
        idata.posterior.attrs.update(attrs)
        return idata

    def log_likelihood(self, *, chunk: int = 64) -> np.ndarray:
        """``log p(y_i | x_i, w) = −ℓ_i(w)`` for every draw and training sample, ``[chain, draw, n]``.

        Evaluated in torch with the declaration's likelihood, batched over draws
        (``condpost._batching.batched``: vmap, else a loop), ``chunk`` draws at a time.
        """
        from ._batching import batched

        post = self._need_posterior("log_likelihood()")
        draws = self._need_draws("log_likelihood()")
        W = torch.as_tensor(
            np.asarray(draws).reshape(-1, self.d), dtype=post.dtype, device=post.device
        )
        x, y, lik = post.x, post.y, post.likelihood

        def one(w):
            return -lik.nll(post.lifted.forward(w, x), y)

        fn = batched(one, f"log-likelihood ({type(post.lifted.net).__name__})")
        with torch.no_grad():
            parts = [fn(W[i : i + chunk]).detach() for i in range(0, W.shape[0], chunk)]
        out = torch.cat(parts) if parts else torch.zeros(0, post.n)
        return out.cpu().numpy().reshape(self.chains, self.num_draws, post.n)

    def _log_likelihood_values(self, mode, max_values: int) -> np.ndarray | None:
        if mode is False or mode is None:
            return None
        if mode not in (True, "auto"):
            raise ValueError(f"log_likelihood must be True, False or 'auto'; got {mode!r}")
        required = mode is True
        name = self.config.get("likelihood", {}).get("name")
        why = None
        if self.posterior is None:
            why = "the declaration is not attached (ReferenceClass.load(..., posterior=post))"
        elif self._draws is None:
            why = "the draws were not kept (keep_draws=False)"
        elif not self.posterior.data.in_memory:
            why = "data= is streamed (a DataLoader/dataset), not held in memory"
        elif name not in ("categorical", "gaussian", "bernoulli") and not required:
            why = f"the likelihood {name!r} is not known to be a normalized density"
        elif self.chains * self.num_draws * int(self.config["n"]) > max_values and not required:
            why = (
                f"chains·draws·n = {self.chains * self.num_draws * int(self.config['n']):,} "
                f"values exceed max_values={max_values:,}"
            )
        if why is None:
            return self.log_likelihood()
        if required:
            raise RuntimeError(f"to_arviz(log_likelihood=True): {why}")
        return None

    def _metadata(self) -> dict:
        return {
            "format": _FORMAT,
            "config": self.config,
            "settings": self.settings,
            "versions": self.versions,
            "created": self.created,
        }

    def save(self, path: str | Path) -> Path:
        """Write draws, per-draw statistics and all metadata to ``path`` (npz, no pickle)."""
        path = Path(path)
        arrays = {"center": self.center}
        if self._draws is not None:
            arrays["draws"] = np.asarray(self._draws)
        for k, v in self._stats.items():
            arrays[f"stat:{k}"] = v
        for k, v in self.records.items():
            arrays[f"record:{k}"] = np.asarray(v)
        meta = json.dumps(self._metadata(), default=_json_default)
        arrays["metadata"] = np.array(meta)
        # atomic: a crash mid-save leaves the previous file (if any) intact
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
        return path

    @classmethod
    def load(cls, path: str | Path, *, posterior: LocalPosterior | None = None) -> ReferenceClass:
        """Read a file written by ``save`` (never unpickles)."""
        path = Path(path)
        if not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is not a condpost ReferenceClass file (expected an npz archive)"
            )
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                if "metadata" not in z.files:
                    raise ValueError(f"{path} has no condpost metadata")
                meta = json.loads(str(z["metadata"]))
                if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
                    fmt = meta.get("format") if isinstance(meta, dict) else meta
                    raise ValueError(f"{path}: unknown format {fmt!r}")
                missing = [k for k in ("config", "settings", "versions") if k not in meta]
                if missing:
                    raise ValueError(f"{path}: damaged metadata, missing {missing}")
                draws = z["draws"] if "draws" in z.files else None
                center = z["center"]
                stats = {k[len("stat:") :]: z[k] for k in z.files if k.startswith("stat:")}
                records = {k[7:]: z[k] for k in z.files if k.startswith("record:")}
        except ValueError:
            raise
        except Exception as e:  # a truncated or altered archive (zip CRC, short read, ...)
            raise ValueError(
                f"{path}: damaged ReferenceClass file ({type(e).__name__}: {e})"
            ) from e
        ref = cls(
            draws=draws,
            stats=stats,
            center=center,
            config=meta["config"],
            settings=meta["settings"],
            versions=meta["versions"],
            created=meta.get("created"),
        )
        ref._source = str(path)
        ref.records = records
        if posterior is not None:
            ref.attach(posterior)
        return ref

    # ------------------------------------------------------------------ influence
    def influence(self, query=None, observable=None, **kwargs):
        """The Bayesian influence function ``Cov_π(ℓ_i, ℓ_j)`` or ``Cov_π(ℓ_i, O)``, with
        Monte Carlo standard errors (``condpost.influence.influence``; docs/influence.md)."""
        from .influence import influence

        return influence(self, query, observable, **kwargs)

    def susceptibility(self, observable, groups, *, query=None, **kwargs):
        """``χ_g = −(nβ/n)·Cov_π(O, Σ_{i∈g} ℓ_i)`` per group, with Monte Carlo standard errors
        (``condpost.influence.susceptibility``; docs/influence.md)."""
        from .influence import susceptibility

        return susceptibility(self, observable, groups, query=query, **kwargs)


def _check_pyro_potential(mcmc, post, W, name, samples, others) -> None:
    """Compare the MCMC kernel's potential with ``post.potential`` at two draws.

    Skipped when the kernel exposes no ``potential_fn`` (e.g. a multi-process run) or the
    model has other latent sites. The two may differ by a constant (normalizers); a
    difference that changes between draws means another posterior.
    """
    kernel = getattr(mcmc, "kernel", None)
    pot = getattr(kernel, "potential_fn", None)
    if pot is None or others:
        return
    C, S, _ = W.shape
    picks = [(0, 0), (C - 1, S - 1)] if C * S > 1 else [(0, 0)]
    diffs = []
    try:
        for c, s in picks:
            sites = {
                f"{name}.{p}": torch.as_tensor(samples[f"{name}.{p}"][c, s])
                for p in post.lifted.names
            }
            with torch.no_grad():
                u_pyro = float(pot(sites))
                u_post = float(post.potential(W[c, s]))
            diffs.append(u_pyro - u_post)
    except Exception:  # noqa: BLE001 - the check is optional
        return
    if len(diffs) == 2 and not np.isclose(
        diffs[0], diffs[1], rtol=1e-5, atol=1e-6 * (1 + abs(diffs[0]))
    ):
        raise ValueError(
            f"from_pyro: the MCMC model is not this declaration's posterior: its potential "
            f"minus post.potential is {diffs[0]:.6g} at one draw and {diffs[1]:.6g} at "
            f"another (a constant offset would be fine). Check that the model uses the same "
            f"data, likelihood, nβ (cp.temper), γ (localization) and constraints "
            f"(cp.preserve) as the declaration."
        )


def _safe(fn, a) -> float:
    """fn over the finite entries of a (inf kept for R-hat), NaN when there are none."""
    a = np.asarray(a, dtype=float).reshape(-1)
    a = a[~np.isnan(a)]
    return float(fn(a)) if a.size else float("nan")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def _record_every(settings: dict) -> int:
    return int(((settings or {}).get("record_losses") or {}).get("every", 1))
