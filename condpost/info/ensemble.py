"""Mutual information and entropy across a reference class (docs/theory.md §3.4).

For one fixed network the activations at two sites are deterministic functions of
each other, so ``I(A;B | W=w)`` is infinite (continuous inputs) or trivially the
entropy of the probe partition (finite probe set). Over the (conditioned) tempered
local posterior, with weights ``W ~ π_C`` independent of the input ``X``, the
weight noise turns the network into a channel and the mutual information becomes
finite; it depends on the precision scale ``(nβ, γ, σ_c)``, which every result
records. Three targets (docs/theory.md §3.4.5):

``"observational"``
    ``I(A;B)`` under the joint law of ``(X, W)``, ``A = g_A(X, W)``, ``B = g_B(X, W)``.
``"channel"``
    ``I(A'; C_W(A'))``: the source activation ``A'`` is drawn independently of the
    weights ``W`` that run the sub-network ``a → b`` (activation patching, as in
    ``CircuitMap``). This removes common-cause dependence through shared upstream
    weights and measures what the reference class of circuits transmits.
``"input"``
    ``I(X; B)`` with ``X`` uniform over a finite probe set of size ``m`` (so
    ``I ≤ log m``, checked): how well the ensemble's activations at ``b`` tell the
    probes apart when one does not know which member of the class ran.

Sampling design (docs/theory.md §3.4.7). ``S`` weight draws × ``m`` probes give ``S·m`` pairs
that are *not* independent: pairs that share a weight draw (or a probe) are coupled,
and k-nearest-neighbour estimators, which assume iid pairs, read that coupling as
information. Every estimate here is therefore built from **iid pairs**: pair ``i``
gets its own weight draw ``w_{s_i}``, used by no other pair, and its own probe
``x_{j_i}``, drawn independently of ``s_i`` (without replacement when there are at
least as many probes as pairs; otherwise a balanced, shuffled assignment, i.e. ``X``
uniform over the probe set). Hence the number of pairs is at most the number of
draws (half of it for ``"channel"`` with ``source="mixture"``, where each pair
needs a second, independent draw ``w'`` to produce ``A' = A(x; w')``).

Error bars: a two-way half-sampling bootstrap (a delete-d jackknife with d = n/2,
Shao & Wu 1989, Ann. Statist. 17:1176) over weight draws and probes. Each replicate
keeps a random half of the weight draws and (when the probes are a sample, see
``resample``) a random half of the probes, re-forms iid pairs from them, recomputes the
activations and re-runs the same estimator with the same settings. For a statistic
whose fluctuations are additive over draws and probes, the variance of a
half-sample estimate about its mean equals the variance of the full estimate
(the delete-d factor ``(n−d)/d`` is 1), so ``stderr`` is the standard deviation of
the replicates. Half-samples, unlike resampling with replacement, never duplicate a
point, which would give k-NN estimators zero distances. The bootstrap measures
sampling variability, not the estimator's own bias (KSG and Kozachenko–Leonenko are
biased at finite N; see ``docs/information.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._errors import warn

if TYPE_CHECKING:  # pragma: no cover
    from ..reference import ReferenceClass

__all__ = ["mutual_information", "entropy", "TARGETS"]

TARGETS = ("observational", "channel", "input")
_SOURCES = ("mixture", "center")
_LABELLED_ESTIMATORS = ("auto", "ross", "gaussian_mixture")


# ---------------------------------------------------------------------------- helpers
def _result_cls():
    from .estimators import InfoResult

    return InfoResult


def _array_mi(x, y, estimator, seed, opts, stderr="auto"):
    from .estimators import mutual_information as mi

    return mi(x, y, estimator=estimator, seed=seed, stderr=stderr, **opts)


def _array_entropy(x, estimator, seed, opts, stderr="auto"):
    from .estimators import entropy as ent

    return ent(x, estimator=estimator, seed=seed, stderr=stderr, **opts)


def _check_target(target: str, allowed: Sequence[str] = TARGETS) -> str:
    if not isinstance(target, str) or target not in allowed:
        from .._errors import nearest

        hint = nearest(str(target), allowed, n=1)
        raise ValueError(
            f"target={target!r} is not one of {list(allowed)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
            + ". 'observational' = I(A;B) under (X, W); 'channel' = I(A'; C_W(A')) with A' "
            "independent of W; 'input' = I(X;B) over a finite probe set (≤ log m)."
        )
    return target


def _positive_int(name: str, v, allow_none: bool = True) -> int | None:
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {v!r}")
    return int(v)


def _resolve_resample(resample, target: str, m: int) -> tuple[str, ...]:
    if resample == "auto":
        # A finite probe set that *defines* X (target="input", or a handful of probes)
        # is not a sample from a population: resampling it would change the target.
        return ("draws", "probes") if (target != "input" and m >= 20) else ("draws",)
    if isinstance(resample, str):
        resample = {"both": ("draws", "probes")}.get(resample, (resample,))
    axes = tuple(resample)
    bad = [a for a in axes if a not in ("draws", "probes")]
    if bad or not axes:
        raise ValueError(
            f"resample must be 'auto', 'both', 'draws', 'probes' or a tuple of 'draws'/'probes'; "
            f"got {resample!r}"
        )
    if "probes" in axes and m < 4:
        raise ValueError(
            f"resample includes 'probes' but there are only {m} probes: half-samples of them "
            f"change the target. Resample 'draws' only, or pass a larger probe sample."
        )
    return axes


def _pairs(draw_pool: np.ndarray, probe_pool: np.ndarray, n: int, rng, two_draws: bool):
    """iid pairs: each weight draw used once; probes independent of the draws."""
    need = 2 * n if two_draws else n
    if need > draw_pool.size:
        raise ValueError(
            f"{n} pairs need {need} distinct weight draws; only {draw_pool.size} are available"
        )
    perm = rng.permutation(draw_pool)
    s = perm[:n]
    s2 = perm[n : 2 * n] if two_draws else None
    if probe_pool.size >= n:
        j = rng.choice(probe_pool, size=n, replace=False)
    else:
        reps = -(-n // probe_pool.size)
        j = np.concatenate([rng.permutation(probe_pool) for _ in range(reps)])[:n]
        j = rng.permutation(j)
    return s, j, s2


def _distinct_rows(v: np.ndarray) -> tuple[int, np.ndarray]:
    """Number of distinct rows and an integer label per row."""
    _, inv = np.unique(np.ascontiguousarray(v), axis=0, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    return int(inv.max()) + 1, inv


class _Forward:
    """Activations for arbitrary (draw, probe) index pairs, optionally patched."""

    def __init__(self, ref: ReferenceClass, probes, chunk: int = 512):
        from ..constraints import _prepare_probes

        post = ref._need_posterior("information estimates")
        self.post = post
        self.p = _prepare_probes(post, probes, "probes")
        self.W = torch.as_tensor(ref.flat().reshape(-1, ref.d), dtype=post.dtype).to(post.device)
        self.chunk = chunk

    def __call__(self, s, j, sites, replace_site=None, replace_vals=None) -> dict:
        lifted = self.post.lifted
        sites = list(sites)

        def one(w, x, r=None):
            rep = None if r is None else {replace_site: r.unsqueeze(0)}
            _, acts = lifted.call(lifted.unflatten(w), x.unsqueeze(0), sites, replace=rep)
            return {k: acts[k][0] for k in sites}

        from .._batching import batched

        bone = batched(one, f"activations ({type(lifted.net).__name__})")

        out: dict[str, list] = {k: [] for k in sites}
        s_t = torch.as_tensor(s, dtype=torch.long)
        j_t = torch.as_tensor(j, dtype=torch.long)
        with torch.no_grad():
            for i in range(0, len(s_t), self.chunk):
                w = self.W[s_t[i : i + self.chunk]]
                x = self.p[j_t[i : i + self.chunk]]
                args = (w, x)
                if replace_vals is not None:
                    args = (w, x, replace_vals[i : i + self.chunk])
                res = bone(*args)
                for k in sites:
                    out[k].append(res[k])
        return {k: torch.cat(v) for k, v in out.items()}


def _flat64(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(t.shape[0], -1).to(torch.float64).cpu().numpy()


def _precision_settings(ref: ReferenceClass) -> dict:
    cons = {}
    for c in ref.config.get("constraints", []):
        cons[c["name"]] = {
            "kind": c.get("kind"),
            "tolerance": c.get("tolerance"),
            "strength": c.get("strength"),
            "rho": c.get("rho"),
        }
    return {
        "nbeta": ref.nbeta,
        "localization": ref.localization,
        "constraints": cons,
        "method": ref.settings.get("method"),
    }


# ---------------------------------------------------------------------- labelled estimators
def _labelled_mi(labels, y, estimator, seed, opts) -> tuple[float, str, dict]:
    """MI between labels (discrete) and continuous y; returns (value, name, settings)."""
    if estimator not in _LABELLED_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r}: one side takes only finitely many values (a finite probe "
            f"set), so continuous estimators (KSG, Gaussian) would see exact ties. Use "
            f"{list(_LABELLED_ESTIMATORS)}: 'ross' (k-NN for discrete × continuous) or "
            f"'gaussian_mixture' (Gaussian fit of B per label, exact mixture MI)."
        )
    y = np.asarray(y, dtype=np.float64)
    sd = y.std(0)
    y = (y - y.mean(0)) / np.where(sd > 0, sd, 1.0)
    if estimator in ("auto", "ross"):
        # Ross (2014) discrete × continuous k-NN: the array estimator's "mixed" counts
        from .estimators import _mixed_value

        k = int(opts.get("k", 3))
        _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if counts.min() <= k:
            raise ValueError(
                f"the k-NN (Ross) estimator needs more than k={k} points per label; the "
                f"smallest label has {counts.min()}. Use more pairs/draws or a smaller k."
            )
        return _mixed_value(codes.reshape(-1), y, k, {"backend": "auto"}), "ross", {"k": k}
    from .estimators import gaussian_mixture_mi

    classes, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
    means = np.stack([y[inv == c].mean(0) for c in range(len(classes))])
    covs = np.stack([np.atleast_2d(np.cov(y[inv == c], rowvar=False)) for c in range(len(classes))])
    kw = {k: opts[k] for k in ("method", "nodes", "n_samples") if k in opts}
    res = gaussian_mixture_mi(means, covs, counts / counts.sum(), seed=seed, **kw)
    return float(res.value), "gaussian_mixture", dict(res.settings)


# ---------------------------------------------------------------------------- core
class _Plan:
    """Everything needed to produce (X-side, Y-side) samples for a set of pairs."""

    def __init__(self, ref, probes, a, b, target, source, kind):
        from ..lifting import resolve_sites

        post = ref._need_posterior("information estimates")
        self.kind = kind
        self.target = target
        self.source = source
        self.fw = _Forward(ref, probes)
        self.m = int(self.fw.p.shape[0])
        self.S = int(ref.chains * ref.num_draws)
        net = post.lifted.net
        self.a = None if a is None else resolve_sites(net, a, "a")[0]
        self.b = None if b is None else resolve_sites(net, b, "b")[0]

    def two_draws(self) -> bool:
        return self.target == "channel" and self.source == "mixture"

    def samples(self, s, j, s2):
        """(x-side array or labels, y-side array, x_is_label)."""
        t = self.target
        if t == "input":
            y = self.fw(s, j, [self.b])[self.b]
            return j.copy(), _flat64(y), True
        if t == "observational":
            sites = [self.a] if self.b is None else [self.a, self.b]
            acts = self.fw(s, j, sites)
            ya = None if self.b is None else _flat64(acts[self.b])
            return _flat64(acts[self.a]), ya, False
        # channel: A' independent of the weights that run a → b
        if self.source == "mixture":
            a_prime = self.fw(s2, j, [self.a])[self.a]
        else:
            center = self.fw.post.center
            with torch.no_grad():
                _, acts = self.fw.post.lifted.call(
                    self.fw.post.lifted.unflatten(center), self.fw.p, [self.a]
                )
            a_prime = acts[self.a][torch.as_tensor(j, dtype=torch.long)]
        y = self.fw(s, j, [self.b], replace_site=self.a, replace_vals=a_prime)[self.b]
        return _flat64(a_prime), _flat64(y), False


def _estimate_pairs(x, y, x_is_label, estimator, seed, opts, kind, stderr="auto"):
    """One estimate on one set of pairs; returns (value, resolved name, settings, raw).

    A side with fewer distinct values than half the pairs (probe identities, or
    activations that do not depend on the lifted weights) is treated as discrete:
    plug-in when both sides are, the Ross k-NN or Gaussian-mixture estimator when one is,
    the array estimators of ``condpost.info.estimators`` otherwise.
    """
    if kind == "entropy":
        n_x, lab = (None, None) if x_is_label else _distinct_rows(x)
        if x_is_label or n_x < 0.5 * len(x):
            labels = np.asarray(x if x_is_label else lab, dtype=np.int64)
            res = _array_entropy(labels, "plugin", seed, {}, stderr)
        else:
            res = _array_entropy(x, estimator, seed, opts, stderr)
        return float(res.value), res.estimator, dict(res.settings), res
    if x_is_label:
        labels = x
    else:
        n_x, lab = _distinct_rows(x)
        labels = lab if n_x < 0.5 * len(x) else None
    n_y, lab_y = _distinct_rows(y)
    y_discrete = n_y < 0.5 * len(y)
    if labels is not None and y_discrete:
        if estimator not in ("auto", "plugin"):
            raise ValueError(
                f"estimator={estimator!r}: both sides take finitely many values here, so only "
                f"the plug-in estimator applies (estimator='auto' or 'plugin')"
            )
        li, yi = np.asarray(labels, dtype=np.int64), np.asarray(lab_y, dtype=np.int64)
        res = _array_mi(li, yi, "plugin", seed, {}, stderr)
        return float(res.value), res.estimator, dict(res.settings), res
    if labels is not None or y_discrete:
        lab, cont = (labels, y) if labels is not None else (lab_y, x)
        val, name, st = _labelled_mi(lab, cont, estimator, seed, opts)
        return val, name, st, None
    res = _array_mi(x, y, estimator, seed, opts, stderr)
    return float(res.value), res.estimator, dict(res.settings), res


def _samples(plan, kind, s, j, s2):
    x, y, lab = plan.samples(s, j, s2)
    if kind == "entropy" and plan.target == "channel":
        return y, None, False  # h(C_W(A')) at site b
    return x, y, lab


def _atoms(x, x_is_label) -> int | None:
    if x_is_label:
        return len(np.unique(x))
    n, _ = _distinct_rows(x)
    return n if n < 0.5 * len(x) else None


def _run(
    ref,
    kind,
    *,
    probes,
    a,
    b,
    target,
    estimator,
    draws,
    pairs,
    bootstrap,
    resample,
    source,
    seed,
    progress,
    opts,
):
    from tqdm.auto import tqdm

    from ..reference import ReferenceClass

    if not isinstance(ref, ReferenceClass):
        raise TypeError(f"ref must be a ReferenceClass; got {type(ref).__name__}")
    if source not in _SOURCES:
        raise ValueError(
            f"source={source!r} must be 'mixture' (A' = A(x; w') with an independent draw w') "
            f"or 'center' (A' = A(x; w*))"
        )
    draws = _positive_int("draws", draws)
    pairs = _positive_int("pairs", pairs)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or bootstrap < 0:
        raise ValueError(f"bootstrap must be an integer ≥ 0 (0 disables it); got {bootstrap!r}")
    if bootstrap == 1:
        raise ValueError("bootstrap=1 gives no spread; use 0 (off) or ≥ 20 replicates")
    plan = _Plan(ref, probes, a, b, target, source, kind)
    if target == "input" and plan.m < 2:
        raise ValueError("target='input' needs at least 2 probes (I(X;B) ≤ log m = 0 with one)")
    rng = np.random.default_rng(seed)
    S_all = plan.S
    if draws is not None and draws > S_all:
        raise ValueError(
            f"draws={draws} exceeds the {S_all} draws in this reference class "
            f"({ref.chains} chains × {ref.num_draws})"
        )
    pool = np.arange(S_all) if draws is None else np.sort(rng.choice(S_all, draws, replace=False))
    per_pair = 2 if plan.two_draws() else 1
    max_pairs = pool.size // per_pair
    if pairs is None:
        pairs = max_pairs
    if pairs > max_pairs:
        raise ValueError(
            f"pairs={pairs} would reuse weight draws: {pool.size} draws give at most {max_pairs} "
            f"iid (x, w) pairs{' (each channel pair needs two draws)' if per_pair == 2 else ''}. "
            f"Pairs that share a draw are dependent and k-NN estimators read that dependence as "
            f"information. Sample more draws or lower pairs."
        )
    if pairs < 20:
        raise ValueError(f"pairs={pairs} is too few for an information estimate (need ≥ 20)")
    axes = _resolve_resample(resample, target, plan.m)
    probe_pool = np.arange(plan.m)
    s, j, s2 = _pairs(pool, probe_pool, pairs, rng, plan.two_draws())
    x, y, x_is_label = _samples(plan, kind, s, j, s2)
    value, name, est_settings, raw = _estimate_pairs(x, y, x_is_label, estimator, seed, opts, kind)
    # the replicates use the estimator resolved on the full set (no re-picking by "auto")
    fixed = estimator if name in ("plugin",) else name
    reps = []
    if bootstrap:
        half = pairs // 2
        for _ in tqdm(
            range(bootstrap),
            desc=f"bootstrap {kind} [{target}]",
            disable=not progress,
            leave=False,
            dynamic_ncols=True,
        ):
            dpool = rng.choice(pool, pool.size // 2, replace=False)
            ppool = (
                rng.choice(probe_pool, plan.m // 2, replace=False)
                if "probes" in axes
                else probe_pool
            )
            sb, jb, s2b = _pairs(dpool, ppool, half, rng, plan.two_draws())
            xb, yb, lab_b = _samples(plan, kind, sb, jb, s2b)
            v, _, _, _ = _estimate_pairs(
                xb, yb, lab_b, fixed, int(rng.integers(2**31)), opts, kind, stderr=None
            )
            reps.append(v)
    reps = np.asarray(reps)
    stderr = float(reps.std(ddof=1)) if reps.size > 1 else float("nan")
    notes: list[str] = []
    atoms = _atoms(x, x_is_label)
    bound = None
    if kind == "mi":
        if target == "input":
            bound = math.log(plan.m)
        elif atoms is not None:
            bound = math.log(atoms)
        if bound is not None:
            excess = value - bound
            # k-NN estimators of discrete × continuous MI reach ψ(N) − ⟨ψ(N_ℓ)⟩ ≈
            # log m + (m − 1)/(2N) on perfectly separated labels: allow twice that offset
            m_atoms = plan.m if target == "input" else atoms
            tol = max(2 * stderr if np.isfinite(stderr) else 0.0, 1e-3, (m_atoms - 1) / pairs)
            if excess > tol:
                msg = (
                    f"the estimate {value:.4g} nats exceeds the bound log m = {bound:.4g} "
                    f"(m = {m_atoms} distinct values) by more than its error; the estimator "
                    f"is biased here (too few pairs, or k too small)."
                )
                notes.append(msg)
                from .estimators import InfoWarning

                warn(msg, InfoWarning)
            elif value > bound - max(tol, 0.02):
                notes.append(
                    f"at the bound log m = {bound:.4g}: the probes are (almost) perfectly "
                    f"distinguishable across the class; a larger value cannot be resolved."
                )
        if value > math.log(pairs) - 1.0:
            notes.append(
                f"estimate {value:.3g} nats is near log N = {math.log(pairs):.3g} (N = {pairs} "
                f"pairs): sample-based estimators cannot resolve more than ~log N; use more "
                f"draws or report a lower bound."
            )
    if bootstrap and reps.size:
        notes.append(
            "stderr: two-way half-sampling bootstrap (delete-d jackknife, d = n/2) over "
            f"{'weight draws and probes' if 'probes' in axes else 'weight draws'}; sampling "
            "error only, not the estimator's bias."
        )
    settings: dict[str, Any] = {
        "target": target,
        "quantity": "mutual_information" if kind == "mi" else "entropy",
        "a": plan.a,
        "b": plan.b,
        "source": source if target == "channel" else None,
        "estimator": name,
        "estimator_settings": est_settings,
        "estimator_opts": dict(opts),
        "num_draws_available": S_all,
        "num_draws_used": int(pool.size),
        "num_probes": plan.m,
        "pairs": int(pairs),
        "atoms": atoms,
        "bound": bound,
        "bootstrap": int(bootstrap),
        "resample": list(axes),
        "bootstrap_mean": float(reps.mean()) if reps.size else None,
        "seed": seed,
        **_precision_settings(ref),
    }
    if raw is not None and np.isfinite(getattr(raw, "stderr", float("nan"))):
        settings["estimator_stderr"] = float(raw.stderr)
    InfoResult = _result_cls()
    return InfoResult(
        value=float(value),
        stderr=stderr,
        estimator=name,
        settings=settings,
        n=int(pairs),
        notes=tuple(notes),
    )


def mutual_information(
    ref: ReferenceClass,
    *,
    probes,
    a: str | None = None,
    b: str,
    target: str = "observational",
    estimator: str = "auto",
    draws: int | None = None,
    pairs: int | None = None,
    bootstrap: int = 200,
    resample="auto",
    source: str = "mixture",
    seed: int = 0,
    progress: bool = True,
    **estimator_opts,
):
    """Mutual information between two sites across a reference class (docs/theory.md §3.4.5).

    Parameters
    ----------
    ref : ReferenceClass
        Draws of a (conditioned) local posterior, with its declaration attached.
    probes : torch.Tensor
        Inputs ``[m, ...]``: ``X`` is uniform over them (a finite probe set) or they are
        an iid sample of a continuous input law (use ``m ≥ pairs``).
    a, b : str
        Sites (module paths; ``""`` is the output). ``a`` is unused for ``"input"``.
    target : {"observational", "channel", "input"}
        ``I(A;B)`` under ``(X, W)``; ``I(A'; C_W(A'))`` with ``A'`` independent of ``W``
        (``a`` must feed ``b``); or ``I(X;B)`` over the probe set (≤ log m).
    estimator : str
        ``"auto"`` or any name of ``condpost.info.mutual_information`` for continuous
        pairs; when one side takes finitely many values (``"input"``, or activations that
        do not depend on the lifted weights) ``"auto"``/``"ross"`` (k-NN, Ross 2014) or
        ``"gaussian_mixture"`` (a Gaussian fit of ``B`` per value and the exact mixture
        MI; exact for linear-in-weights readouts of a Gaussian posterior, an
        approximation otherwise).
    draws : int, optional
        Use a random subset of this many weight draws (default all).
    pairs : int, optional
        Number of iid ``(x, w)`` pairs (default: the number of draws; half of it for
        ``"channel"`` with ``source="mixture"``). Never more: a draw is used once.
    bootstrap : int
        Half-sampling replicates for ``stderr`` (default 200; 0 disables it).
    resample : "auto", "draws", "probes", "both" or tuple
        Bootstrap axes. ``"auto"``: weight draws always; probes too when they are a
        sample (``m ≥ 20`` and ``target != "input"``).
    source : {"mixture", "center"}
        ``"channel"`` only: ``A' = A(x; w')`` with an independent draw ``w'`` (the
        activation law over the class), or ``A' = A(x; w*)``.
    seed : int
        Seed of pairing, bootstrap and any estimator randomness.
    progress : bool
        Progress bar over bootstrap replicates.
    **estimator_opts
        Passed to the array estimator (e.g. ``k``).

    Returns
    -------
    InfoResult
        ``value`` (nats), ``stderr`` (bootstrap), ``estimator`` and ``settings`` with the
        target, sites, ``nβ``, ``γ``, constraint tolerances, draws, probes, pairs.
    """
    target = _check_target(target)
    if target == "input":
        if a is not None:
            raise ValueError(
                "target='input' measures I(X;B) with X the probe identity: leave a=None (got "
                f"a={a!r}); for activations at a use target='observational'"
            )
    elif a is None:
        raise ValueError(f"target={target!r} needs the site a (a module path)")
    if a is not None and a == b:
        raise ValueError(f"a and b are the same site {a!r}; I(A;A) is the entropy: use entropy()")
    return _run(
        ref,
        "mi",
        probes=probes,
        a=a,
        b=b,
        target=target,
        estimator=estimator,
        draws=draws,
        pairs=pairs,
        bootstrap=bootstrap,
        resample=resample,
        source=source,
        seed=seed,
        progress=progress,
        opts=estimator_opts,
    )


def entropy(
    ref: ReferenceClass,
    *,
    probes,
    a: str,
    b: str | None = None,
    target: str = "observational",
    estimator: str = "auto",
    draws: int | None = None,
    pairs: int | None = None,
    bootstrap: int = 200,
    resample="auto",
    source: str = "mixture",
    seed: int = 0,
    progress: bool = True,
    **estimator_opts,
):
    """Differential entropy of activations across a reference class, with bootstrap errors.

    ``target="observational"``: ``h(A)`` of the site ``a`` under iid ``(x, w)`` pairs.
    ``target="channel"``: ``h(C_W(A'))`` at site ``b`` with ``A'`` at site ``a`` drawn
    independently of ``W`` (as in ``mutual_information``). Activations that take
    finitely many values get the plug-in (discrete) entropy. Other arguments as in
    ``mutual_information``. Differential entropies depend on the units of the
    activations (a rescaling by ``c`` shifts ``h`` by ``dim·log|c|``); estimator options
    such as standardisation are those of ``condpost.info.entropy`` on arrays.
    """
    target = _check_target(target, ("observational", "channel"))
    if target == "channel" and b is None:
        raise ValueError("target='channel' needs b, the site downstream of a whose entropy to take")
    if target == "observational" and b is not None:
        raise ValueError("target='observational' takes one site a; b is for target='channel'")
    res = _run(
        ref,
        "entropy",
        probes=probes,
        a=a,
        b=b,
        target=target,
        estimator=estimator,
        draws=draws,
        pairs=pairs,
        bootstrap=bootstrap,
        resample=resample,
        source=source,
        seed=seed,
        progress=progress,
        opts=estimator_opts,
    )
    return res
