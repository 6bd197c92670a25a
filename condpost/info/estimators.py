"""Mutual-information and entropy estimators on arrays (nats).

Every estimator takes samples ``x [N, dx]``, ``y [N, dy]`` (numpy or torch; 1-D arrays
are one column) and returns an :class:`InfoResult`. Formulas, biases and the rules of
``estimator="auto"`` are documented in ``docs/estimators.md``; each function's docstring
states its formula and source.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import digamma, ndtri

from . import _knn
from ._common import InfoWarning, _resolve_stderr

__all__ = [
    "InfoResult",
    "InfoWarning",
    "mutual_information",
    "entropy",
    "gaussian_mixture_mi",
    "MI_ESTIMATORS",
    "ENTROPY_ESTIMATORS",
]


@dataclass(frozen=True)
class InfoResult:
    """Result of an information estimate.

    Attributes
    ----------
    value : float
        The estimate in nats.
    stderr : float
        Its standard error (``nan`` when not computed); ``settings["stderr"]`` says how.
    estimator : str
        The estimator actually used (``"auto"`` is resolved).
    settings : dict
        Every setting that determines the value (k, variant, back end, stderr method, ...).
    n : int
        Number of samples (pairs) used.
    notes : tuple of str
        Human-readable remarks: what ``auto`` picked and why, saturation and tie flags.
    details : dict
        Estimator-specific extras (canonical correlations, per-term values, bound, ...).
    upper_bound : float or None
        The largest value the data can resolve, when one applies: ``log K`` for a side
        that takes ``K`` distinct values, ``log N`` for sample-based estimates from ``N``
        pairs (the smaller of those that apply). ``value`` never exceeds it.
    bound : bool
        ``True`` when the estimator's own number reached or exceeded ``upper_bound`` and
        ``value`` was set to the bound: read it as "at the resolution limit", not as
        an estimate (``details["raw_value"]`` keeps the estimator's number).
    """

    value: float
    stderr: float
    estimator: str
    settings: dict = field(default_factory=dict)
    n: int = 0
    notes: tuple = ()
    details: dict = field(default_factory=dict)
    upper_bound: float | None = None
    bound: bool = False

    def __float__(self) -> float:
        return float(self.value)

    def __repr__(self) -> str:
        se = "" if not np.isfinite(self.stderr) else f" ± {self.stderr:.4f}"
        note = f"; {len(self.notes)} note(s)" if self.notes else ""
        lead = "bound: ≤ " if self.bound else ""
        return (
            f"InfoResult({lead}{self.value:.4f}{se} nats, estimator={self.estimator!r}, "
            f"n={self.n}{note})"
        )


def _apply_ceiling(
    val: float, ceilings: list[tuple[float, str]], tol: float, notes: list[str]
) -> tuple[float, float | None, bool, bool]:
    """Clip ``val`` to the smallest resolvable ceiling; returns (value, ceiling, bound, warn).

    ``ceilings`` are ``(log-bound, why)`` pairs. An estimate above the ceiling is
    impossible (``log K``) or unresolvable (``log N``): the value is replaced by the
    ceiling and labelled. ``warn`` is True when the excess is beyond ``tol`` (the
    estimator's known finite-sample offset), i.e. when the estimator failed.
    """
    if not ceilings:
        return val, None, False, False
    ceiling, why = min(ceilings, key=lambda c: c[0])
    if not np.isfinite(val) or val <= ceiling:
        return val, ceiling, False, False
    excess = val - ceiling
    notes.append(
        f"BOUND: the estimator returned {val:.4g} nats, above {why} = {ceiling:.4g}; the value "
        f"reported is that bound (result.bound = True), not an estimate. "
        + (
            "The excess is within the estimator's finite-sample offset: the two sides are "
            "(almost) perfectly dependent at this resolution."
            if excess <= tol
            else "The excess is beyond the estimator's error: it is biased here; more "
            "pairs, or a lower-dimensional view of the sites, are needed to say more."
        )
    )
    return ceiling, ceiling, True, excess > tol


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------


def _is_discrete_dtype(a: Any) -> bool:
    if torch.is_tensor(a):
        return not (a.is_floating_point() or a.is_complex())
    return np.asarray(a).dtype.kind in "biu"


def _device_of(*arrays: Any) -> torch.device | None:
    for a in arrays:
        if torch.is_tensor(a) and a.device.type != "cpu":
            return a.device
    return None


def _as_2d(a: Any, name: str, *, discrete: bool = False) -> np.ndarray:
    """``a`` as a 2-D numpy array ``[N, d]``; clear errors for bad shapes or values."""
    if torch.is_tensor(a):
        a = a.detach().cpu().numpy()
    try:
        arr = np.asarray(a)
    except Exception as e:  # pragma: no cover - exotic inputs
        raise TypeError(f"{name} must be a numpy array or torch tensor; got {type(a)}") from e
    if arr.dtype == object:
        raise TypeError(f"{name} must be numeric; got an object array")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(
            f"{name} must have shape [N] or [N, d]; got {tuple(arr.shape)}. Flatten the "
            f"feature dimensions with {name}.reshape(N, -1)."
        )
    if arr.shape[0] < 4 or arr.shape[1] < 1:
        raise ValueError(f"{name} needs at least 4 samples and 1 column; got {tuple(arr.shape)}")
    if discrete:
        if arr.dtype.kind == "f":
            _check_finite(arr, name)
        return arr
    arr = arr.astype(np.float64, copy=False)
    _check_finite(arr, name)
    const = np.flatnonzero(np.ptp(arr, axis=0) == 0)
    if const.size:
        j = int(const[0])
        raise ValueError(
            f"{name}[:, {j}] is constant (every value is {arr[0, j]!r}); "
            f"{const.size} constant column(s) in all: {const[:10].tolist()}. A constant "
            f"coordinate carries no information and breaks standardisation; drop it "
            f"(e.g. {name}[:, {name}.std(0) > 0])."
        )
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        cols = np.flatnonzero(bad.any(0))
        raise ValueError(
            f"{name} contains {int(bad.sum())} non-finite value(s) (NaN or inf) in column(s) "
            f"{cols[:10].tolist()}; the first is {name}[{i}, {j}] = {arr[i, j]}. Drop or "
            f"clean those rows (in both arguments) before estimating."
        )


def _shape2(a: Any, name: str) -> tuple[int, int]:
    shp = tuple(a.shape) if hasattr(a, "shape") else np.shape(a)
    if len(shp) == 1:
        return int(shp[0]), 1
    if len(shp) != 2:
        raise ValueError(
            f"{name} must have shape [N] or [N, d]; got {shp}. Flatten the feature "
            f"dimensions with {name}.reshape(N, -1)."
        )
    return int(shp[0]), int(shp[1])


def _pair(x: Any, y: Any, discrete: bool = False) -> tuple[np.ndarray, np.ndarray]:
    xa, ya = _as_2d(x, "x", discrete=discrete), _as_2d(y, "y", discrete=discrete)
    if xa.shape[0] != ya.shape[0]:
        raise ValueError(
            f"x and y must hold the same number of samples (rows, paired); got "
            f"{xa.shape[0]} and {ya.shape[0]}"
        )
    return xa, ya


def _standardize(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(0)) / a.std(0)


def _copula(a: np.ndarray) -> np.ndarray:
    """Per-column normal scores ``Φ⁻¹(rank / (N + 1))`` (average ranks for ties).

    Mutual information is invariant under strictly monotone maps of each coordinate, so
    this transform leaves ``I(X;Y)`` unchanged while making every marginal standard normal
    (the Gaussian-copula transform of Ince et al. 2017, Hum. Brain Mapp. 38:1541).
    """
    n = a.shape[0]
    order = np.argsort(a, axis=0, kind="stable")
    r = np.empty(a.shape, dtype=np.float64)
    np.put_along_axis(r, order, np.broadcast_to(np.arange(1.0, n + 1.0)[:, None], a.shape), 0)
    srt = np.take_along_axis(a, order, 0)
    tied = np.flatnonzero((np.diff(srt, axis=0) == 0).any(0))
    if tied.size:  # average ranks for ties (scipy.stats is slow to import; only when needed)
        from scipy.stats import rankdata

        r[:, tied] = rankdata(a[:, tied], axis=0, method="average")
    return ndtri(r / (n + 1.0))


def _duplicate_fraction(a: np.ndarray) -> float:
    return 1.0 - np.unique(a, axis=0).shape[0] / a.shape[0]


# --------------------------------------------------------------------------------------
# standard errors
# --------------------------------------------------------------------------------------


def _subsample_se(
    fn: Callable[..., float], arrays: tuple, n_subsets: int, rng: np.random.Generator, min_n: int
) -> tuple[float, int]:
    """Standard error from ``B`` disjoint random subsets of size ``N/B``.

    ``SE(N) ≈ sd_b[Î(subset_b)] / √B`` assumes ``Var Î ∝ 1/N`` (true for kNN estimators
    at fixed k, Kraskov et al. 2004). Unlike the bootstrap it creates no duplicate points,
    which would bias every nearest-neighbour estimator.
    """
    n = arrays[0].shape[0]
    b = min(int(n_subsets), n // max(min_n, 1))
    if b < 2:
        return float("nan"), b
    perm = rng.permutation(n)
    parts = np.array_split(perm[: (n // b) * b], b)
    vals = [fn(*(a[p] for a in arrays)) for p in parts]
    return float(np.std(vals, ddof=1) / math.sqrt(b)), b


def _bootstrap_se(
    fn: Callable[..., float], arrays: tuple, n_boot: int, rng: np.random.Generator
) -> float:
    """Nonparametric bootstrap standard error (resampling rows with replacement)."""
    n = arrays[0].shape[0]
    vals = []
    for _ in range(int(n_boot)):
        idx = rng.integers(0, n, n)
        vals.append(fn(*(a[idx] for a in arrays)))
    return float(np.std(vals, ddof=1))


# --------------------------------------------------------------------------------------
# Gaussian (canonical correlations)
# --------------------------------------------------------------------------------------


def _logdet_bias(p: int, n: int) -> float:
    """``E[log det S] − log det Σ`` for the unbiased sample covariance of ``n`` Gaussian draws.

    ``Σ_{i=1}^{p} ψ((n − i)/2) − p log((n − 1)/2)`` (Misra, Singh & Demchuk 2005,
    J. Multivariate Anal. 92:324).
    """
    i = np.arange(1, p + 1)
    return float(np.sum(digamma((n - i) / 2.0)) - p * math.log((n - 1) / 2.0))


def _whitener(c: np.ndarray, rtol: float = 1e-10) -> np.ndarray:
    """``W`` with ``Wᵀ c W = I_r`` on the range of ``c`` (r = numerical rank).

    Redundant columns (exact linear — after the copula step, monotone — functions of the
    others) add no information, so dropping the null directions leaves the MI unchanged.
    """
    w, V = np.linalg.eigh(np.atleast_2d(c))
    keep = w > rtol * max(float(w.max()), 1e-300)
    return V[:, keep] / np.sqrt(w[keep])


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    """A square root ``L`` with ``L Lᵀ = c`` for a (possibly singular) PSD matrix."""
    w, V = np.linalg.eigh(np.atleast_2d(c))
    return V * np.sqrt(np.clip(w, 0.0, None))


def _canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    dx = x.shape[1]
    c = np.corrcoef(np.concatenate([x, y], axis=1), rowvar=False)
    c = np.atleast_2d(c)
    m = _whitener(c[:dx, :dx]).T @ c[:dx, dx:] @ _whitener(c[dx:, dx:])
    rho = np.linalg.svd(m, compute_uv=False)
    return np.clip(rho, 0.0, 1.0 - 1e-15)


def _gaussian_mi_value(
    x: np.ndarray, y: np.ndarray, bias_correct: bool
) -> tuple[float, np.ndarray]:
    rho = _canonical_correlations(x, y)
    val = float(-0.5 * np.sum(np.log1p(-(rho**2))))
    if bias_correct:
        n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
        val -= 0.5 * (_logdet_bias(dx, n) + _logdet_bias(dy, n) - _logdet_bias(dx + dy, n))
    return val, rho


def _check_gaussian_n(n: int, d: int, what: str) -> None:
    if n <= d + 1:
        raise ValueError(
            f"the {what} estimator needs more samples than dimensions: N = {n} but "
            f"dx + dy = {d}. Use more samples or fewer coordinates."
        )


# --------------------------------------------------------------------------------------
# KSG
# --------------------------------------------------------------------------------------


def _check_k(k: int, n: int) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if k >= n - 1:
        raise ValueError(f"k = {k} must be smaller than N - 1 = {n - 1}; lower k")
    return int(k)


def _ksg_value(
    x: np.ndarray, y: np.ndarray, k: int, variant: int, knn: dict
) -> tuple[float, np.ndarray, np.ndarray]:
    """KSG estimate and per-point terms (Kraskov et al. 2004, eqs. 8 and 9).

    Variant 1: ``ψ(k) + ψ(N) − ⟨ψ(n_x + 1) + ψ(n_y + 1)⟩`` (strict counts).
    Variant 2: ``ψ(k) − 1/k + ψ(N) − ⟨ψ(n_x) + ψ(n_y)⟩`` (counts with ``≤``).
    """
    n = x.shape[0]
    eps, nx, ny, _ = _knn.ksg_counts(x, y, k, variant, **knn)
    if variant == 1:
        terms = digamma(k) + digamma(n) - digamma(nx + 1.0) - digamma(ny + 1.0)
    else:
        terms = digamma(k) - 1.0 / k + digamma(n) - digamma(nx) - digamma(ny)
    return float(np.mean(terms)), terms, eps


def _knn_opts(opts: dict, device, metric: str = "max") -> dict:
    return {
        "backend": opts.pop("backend", "auto"),
        "device": opts.pop("device", device),
        "block": opts.pop("block", None),
        "metric": opts.pop("metric", metric),
    }


def _resolve_metric(knn: dict, n: int, dim: int) -> dict:
    """``metric="auto"``: max-norm where a KD-tree is used, Euclidean for brute force."""
    if knn["metric"] != "auto":
        return knn
    backend = knn["backend"]
    if backend == "auto":
        backend = _knn.choose_backend(n, dim, knn["device"])
    return {**knn, "metric": "max" if backend == "tree" else "euclidean"}


def _mi_ksg(x, y, *, k, variant, standardize, stderr, rng, knn, n_subsets, notes):
    n = x.shape[0]
    k = _check_k(10 if k is None else k, n)
    if variant not in (1, 2):
        raise ValueError(f"variant must be 1 or 2 (KSG estimator I^(1) or I^(2)); got {variant!r}")
    if standardize:
        x, y = _standardize(x), _standardize(y)
    knn = _resolve_metric(knn, n, x.shape[1] + y.shape[1])
    val, terms, eps = _ksg_value(x, y, k, variant, knn)
    if np.any(eps == 0):
        notes.append(
            f"{int(np.sum(eps == 0))} point(s) have {k} or more exact duplicates in (x, y); "
            "KSG assumes continuous data. Use estimator='plugin' for discrete data."
        )
    se_method = _resolve_stderr(stderr, "subsample", ("subsample", "analytic"), "ksg")
    se, extra = float("nan"), {}
    if se_method == "subsample":
        se, b = _subsample_se(
            lambda a, c: _ksg_value(a, c, k, variant, knn)[0],
            (x, y),
            n_subsets,
            rng,
            min_n=max(5 * k, 50),
        )
        extra["n_subsets"] = b
    elif se_method == "analytic":
        se = float(np.std(terms, ddof=1) / math.sqrt(n))
    backend = knn["backend"]
    if backend == "auto":
        backend = _knn.choose_backend(n, x.shape[1] + y.shape[1], knn["device"])
    settings = {
        "k": k,
        "variant": variant,
        "metric": knn["metric"],
        "backend": backend,
        "standardize": bool(standardize),
        "stderr": se_method,
        **extra,
    }
    return val, se, settings, {"terms_mean": val}


# --------------------------------------------------------------------------------------
# copula + Gaussian-surrogate bias-corrected KSG (the default)
# --------------------------------------------------------------------------------------


def _copula_ksg_value(x, y, k, variant, knn, n_surrogates, rng) -> tuple[float, dict]:
    """``Î = Î_KSG(u, v) − mean_s Î_KSG(ũ_s, ṽ_s) + I_G(Ĉ)`` on copula-normal scores.

    ``(u, v)`` are the normal scores of ``(x, y)``; ``(ũ_s, ṽ_s)`` are copula-transformed
    draws of ``N(0, Ĉ)`` with ``Ĉ`` the correlation of ``(u, v)``, whose MI is exactly
    ``I_G(Ĉ) = −½ Σ log(1 − ρ̂_i²)``. The surrogate term is a parametric-bootstrap
    estimate of the KSG bias at this N, dimension and correlation structure.
    """
    u, v = _copula(x), _copula(y)
    ksg_uv, _, _ = _ksg_value(u, v, k, variant, knn)
    ig, rho = _gaussian_mi_value(u, v, bias_correct=False)
    dx = u.shape[1]
    z = np.concatenate([u, v], axis=1)
    c = np.corrcoef(z, rowvar=False)
    chol = _sqrt_psd(c)
    sur = []
    for _ in range(int(n_surrogates)):
        g = rng.standard_normal(z.shape) @ chol.T
        gs = _copula(g)
        sur.append(_ksg_value(gs[:, :dx], gs[:, dx:], k, variant, knn)[0])
    bias = float(np.mean(sur)) - ig
    return ksg_uv - bias, {
        "ksg_raw": ksg_uv,
        "ksg_surrogate": sur,
        "gaussian_copula": ig,
        "bias_estimate": bias,
        "canonical_correlations": rho,
    }


def _mi_copula_ksg(x, y, *, k, variant, stderr, rng, knn, n_subsets, n_surrogates, notes):
    n = x.shape[0]
    k = _check_k(5 if k is None else k, n)
    _check_gaussian_n(n, x.shape[1] + y.shape[1], "copula_ksg")
    dup = max(_duplicate_fraction(x), _duplicate_fraction(y))
    if dup > 0.01:
        notes.append(
            f"{dup:.1%} duplicate rows: the copula and KSG steps assume continuous data "
            "(ties get average ranks). Use estimator='plugin' for discrete data."
        )
    knn = _resolve_metric(knn, n, x.shape[1] + y.shape[1])
    val, det = _copula_ksg_value(x, y, k, variant, knn, n_surrogates, rng)
    se_method = _resolve_stderr(stderr, "subsample", ("subsample",), "copula_ksg")
    se, extra = float("nan"), {}
    if se_method == "subsample":
        se, b = _subsample_se(
            lambda a, c: _copula_ksg_value(a, c, k, variant, knn, n_surrogates, rng)[0],
            (x, y),
            n_subsets,
            rng,
            min_n=max(5 * k, 50, 2 * (x.shape[1] + y.shape[1])),
        )
        extra["n_subsets"] = b
    settings = {
        "k": k,
        "variant": variant,
        "metric": knn["metric"],
        "transform": "copula-normal scores",
        "n_surrogates": int(n_surrogates),
        "backend": knn["backend"]
        if knn["backend"] != "auto"
        else _knn.choose_backend(n, x.shape[1] + y.shape[1], knn["device"]),
        "stderr": se_method,
        **extra,
    }
    return val, se, settings, det


# --------------------------------------------------------------------------------------
# discrete-continuous kNN (Ross 2014)
# --------------------------------------------------------------------------------------


def _mixed_value(labels: np.ndarray, y: np.ndarray, k: int, knn: dict) -> float:
    """Ross (2014, PLoS ONE 9:e87357): ``ψ(N) − ⟨ψ(N_{x_i})⟩ + ⟨ψ(k_i)⟩ − ⟨ψ(m_i)⟩``.

    ``N_{x_i}`` is the number of samples sharing ``x_i``; ``k_i = min(k, N_{x_i} − 1)``.
    """
    n = labels.shape[0]
    counts = np.bincount(labels)
    nx = counts[labels]
    ki = np.minimum(k, nx - 1)
    m, _ = _knn.mixed_counts(labels, y, ki, **knn)
    return float(digamma(n) - np.mean(digamma(nx)) + np.mean(digamma(ki)) - np.mean(digamma(m)))


def _mi_mixed(labels, y, *, k, standardize, stderr, rng, knn, n_subsets, notes):
    n = labels.shape[0]
    k = _check_k(k, n)
    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        raise ValueError(
            f"the discrete argument has {int(np.sum(counts == 1))} value(s) seen only once; "
            "the discrete-continuous kNN estimator needs at least 2 samples per value. "
            "Merge rare values or collect more samples."
        )
    if standardize:
        y = _standardize(y)
    val = _mixed_value(labels, y, k, knn)
    se_method = _resolve_stderr(stderr, "subsample", ("subsample",), "mixed")
    se, extra = float("nan"), {}
    if se_method == "subsample":

        def fn(lab, yy):
            _, lab = np.unique(lab, return_inverse=True)
            c = np.bincount(lab)
            if c.min() < 2:
                return float("nan")
            return _mixed_value(lab, yy, k, knn)

        se, b = _subsample_se(fn, (labels, y), n_subsets, rng, min_n=max(50, 10 * counts.size))
        extra["n_subsets"] = b
    settings = {
        "k": k,
        "metric": "max-norm",
        "standardize": bool(standardize),
        "stderr": se_method,
        "backend": knn["backend"]
        if knn["backend"] != "auto"
        else _knn.choose_backend(n, y.shape[1], knn["device"]),
        **extra,
    }
    return val, se, settings, {}


# --------------------------------------------------------------------------------------
# plug-in (discrete)
# --------------------------------------------------------------------------------------


def _symbols(a: np.ndarray) -> tuple[np.ndarray, int]:
    _, inv = np.unique(a, axis=0, return_inverse=True)
    inv = np.asarray(inv).reshape(-1)
    return inv, int(inv.max()) + 1


def _plugin_h(labels: np.ndarray, miller_madow: bool) -> float:
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    n = counts.sum()
    p = counts / n
    h = float(-np.sum(p * np.log(p)))
    if miller_madow:
        h += (counts.size - 1) / (2.0 * n)
    return h


def _plugin_mi_value(lx: np.ndarray, ly: np.ndarray, miller_madow: bool) -> float:
    kx = int(lx.max()) + 1
    joint = lx.astype(np.int64) + kx * ly.astype(np.int64)
    _, lj = np.unique(joint, return_inverse=True)
    return _plugin_h(lx, miller_madow) + _plugin_h(ly, miller_madow) - _plugin_h(lj, miller_madow)


# --------------------------------------------------------------------------------------
# projection onto leading principal components (high-dimensional sides)
# --------------------------------------------------------------------------------------


def _pca_basis(a: np.ndarray, components: int, variance: float) -> tuple[np.ndarray, dict]:
    """Leading principal directions ``V [d, k]`` of the centred data and what they keep.

    ``k`` is the smallest number of components whose eigenvalues reach ``variance`` of
    the total, at most ``components``; directions with eigenvalue ≤ 1e-12 of the largest
    (exact linear redundancy) are never kept. A side with ``d ≤ components`` columns is
    left as it is (``V = I``).
    """
    n, d = a.shape
    if d <= components:
        return np.eye(d), {"dim": d, "components": d, "variance_kept": 1.0}
    c = a - a.mean(0)
    ev, vec = np.linalg.eigh(c.T @ c)  # d × d: cheaper than an SVD of the N × d data
    ev, vec = np.clip(ev[::-1], 0.0, None), vec[:, ::-1]
    tot = float(ev.sum())
    frac = np.cumsum(ev) / tot
    k = int(np.searchsorted(frac, variance - 1e-12) + 1)
    k = max(1, min(k, int(components), int(np.sum(ev > 1e-12 * ev[0]))))
    return vec[:, :k], {"dim": d, "components": k, "variance_kept": float(frac[k - 1])}


def _mi_pca_copula_ksg(
    x, y, *, k, variant, stderr, rng, knn, n_subsets, n_surrogates, notes, components, variance
):
    """Copula-KSG on the leading principal components of each side (docs/estimators.md).

    ``I(P x; Q y) ≤ I(x; y)`` for any fixed maps ``P, Q`` (data processing), with
    equality when the dropped directions are independent of everything else. PCA does
    not look at the other side, so choosing the directions from the same sample adds
    no dependence between them.
    """
    if (
        not isinstance(components, (int, np.integer))
        or isinstance(components, bool)
        or components < 1
    ):
        raise ValueError(
            f"components must be a positive integer (principal components kept per side); "
            f"got {components!r}"
        )
    if not (0.0 < float(variance) <= 1.0):
        raise ValueError(
            f"variance must be in (0, 1] (fraction of variance kept); got {variance!r}"
        )
    vx, ix = _pca_basis(x, int(components), float(variance))
    vy, iy = _pca_basis(y, int(components), float(variance))
    px, py = (x - x.mean(0)) @ vx, (y - y.mean(0)) @ vy
    for name, info_ in (("x", ix), ("y", iy)):
        if info_["components"] < info_["dim"]:
            notes.append(
                f"{name} ({info_['dim']} columns) projected onto its top {info_['components']} "
                f"principal component(s), keeping {info_['variance_kept']:.2%} of its variance: "
                f"the value is I(projected x; projected y) ≤ I(x; y) (data processing), equal "
                f"when the dropped directions carry no information about the other side"
            )
    val, se, settings, det = _mi_copula_ksg(
        px,
        py,
        k=k,
        variant=variant,
        stderr=stderr,
        rng=rng,
        knn=knn,
        n_subsets=n_subsets,
        n_surrogates=n_surrogates,
        notes=notes,
    )
    settings = {
        **settings,
        "projection": "pca",
        "components": int(components),
        "variance": float(variance),
        "x_projection": ix,
        "y_projection": iy,
    }
    return val, se, settings, det


# --------------------------------------------------------------------------------------
# public: mutual information on arrays
# --------------------------------------------------------------------------------------

MI_ESTIMATORS = (
    "auto",
    "copula_ksg",
    "ksg",
    "ksg1",
    "ksg2",
    "gaussian",
    "copula",
    "plugin",
    "mixed",
    "infonce",
    "smile",
    "pca_copula_ksg",
)

# estimators whose value comes from nearest-neighbour counts on N samples: they cannot
# resolve more than log N nats (McAllester & Stratos 2020), so values above it are clipped
_KNN_ESTIMATORS = ("ksg1", "ksg2", "copula_ksg", "pca_copula_ksg", "mixed")
_PCA_COMPONENTS = 4
_PCA_VARIANCE = 0.99

# pairs x dimension above which auto leaves brute-force kNN on CPU (about 30 s of work)
_AUTO_KNN_WORK = 5e10
_AUTO_NEURAL_DIM = 100


def _auto_mi(x_raw, y_raw, n, dx, dy, device) -> tuple[str, str]:
    if _is_discrete_dtype(x_raw) and _is_discrete_dtype(y_raw):
        return "plugin", "both arguments have integer/bool dtype"
    if _is_discrete_dtype(x_raw) or _is_discrete_dtype(y_raw):
        which = "x" if _is_discrete_dtype(x_raw) else "y"
        return "mixed", (
            f"{which} has integer/bool dtype (discrete) and the other is continuous: the "
            "discrete-continuous kNN estimator of Ross (2014)"
        )
    d = dx + dy
    if d > _AUTO_NEURAL_DIM or n <= d + 1:
        return "pca_copula_ksg", (
            f"dx + dy = {d} with N = {n} samples: kNN estimators are strongly biased at this "
            f"dimension and a Gaussian-copula fit can return values no sample can support, so "
            f"each side with more than {_PCA_COMPONENTS} coordinates is projected onto its "
            f"leading principal components first (a lower bound by data processing, exact "
            f"when the dropped directions carry no information)"
        )
    if device is None and d > _knn._TREE_MAX_DIM and 2.0 * n * n * d > _AUTO_KNN_WORK:
        return "copula", (
            f"N = {n}, dx + dy = {d}: exact kNN would need ~{2 * n * n * d:.1e} distance "
            "operations on CPU; using the Gaussian copula (pass a CUDA tensor, or "
            "estimator='copula_ksg', to force kNN)"
        )
    return "copula_ksg", (
        f"continuous data, dx + dy = {d}, N = {n}: KSG on copula-normal scores with a "
        "Gaussian-surrogate bias correction"
    )


def mutual_information(
    x: Any,
    y: Any,
    estimator: str = "auto",
    *,
    k: int | None = None,
    standardize: bool = True,
    stderr: str | None = "auto",
    seed: int = 0,
    **opts: Any,
) -> InfoResult:
    r"""Mutual information ``I(X;Y)`` in nats from paired samples.

    Parameters
    ----------
    x, y : array ``[N]`` or ``[N, d]`` (numpy or torch; rows are paired samples)
    estimator : str
        ``"auto"`` (default; see below), ``"copula_ksg"``, ``"ksg"``/``"ksg1"``,
        ``"ksg2"``, ``"gaussian"``, ``"copula"``, ``"plugin"``, ``"mixed"`` (one argument
        discrete, the other continuous), ``"infonce"``, ``"smile"``,
        ``"pca_copula_ksg"`` (``copula_ksg`` on each side's leading principal components).
    k : int, optional
        Neighbour order for kNN estimators (default 10 for ``ksg``, 5 for ``copula_ksg``,
        3 for ``mixed``).
    standardize : bool
        Scale each coordinate to zero mean and unit variance first (MI is invariant to
        this; kNN and neural estimators are not). Rank-based estimators ignore it.
    stderr : {"auto", "subsample", "bootstrap", "analytic", None}
        How to compute ``.stderr``. ``"auto"``: disjoint-subset (subsample) for kNN
        estimators, bootstrap for ``gaussian``/``copula``/``plugin``, held-out batches for
        neural ones. ``None`` skips it (``nan``).
    seed : int
        Seed for subsets, bootstrap draws, surrogates and neural training.
    **opts
        Estimator options: ``variant`` (1 or 2, KSG), ``backend`` (``"auto"``, ``"tree"``,
        ``"brute"``), ``device``, ``block``, ``n_subsets`` (10), ``n_boot`` (200),
        ``n_surrogates`` (1), ``bias_correct`` (True, Gaussian), ``miller_madow`` (False,
        plug-in), ``discrete`` (``"x"`` or ``"y"``, mixed; default: the integer-typed
        one), ``components`` (4) and ``variance`` (0.99) for ``pca_copula_ksg``, neural
        options (``batch_size``, ``steps``, ``lr``, ``hidden``, ``clip``, ``progress``).

    Returns
    -------
    InfoResult
        ``value`` never exceeds ``upper_bound``: ``log N`` for the nearest-neighbour
        estimators, ``log K`` for a discrete side with ``K`` values. An estimate above it
        is replaced by the bound with ``bound=True`` and a note (and an ``InfoWarning``
        when the excess is beyond the estimator's known finite-sample offset).

    Notes
    -----
    ``"auto"`` picks: ``plugin`` when both arguments have integer/bool dtype; ``mixed`` when
    exactly one has; otherwise
    ``copula_ksg`` (KSG on per-coordinate normal scores minus the KSG bias measured on a
    Gaussian surrogate with the same correlation); ``copula`` when ``N ≤ dx + dy + 1`` or the
    exact kNN work would be excessive on CPU; ``pca_copula_ksg`` when ``dx + dy > 100``
    or ``N ≤ dx + dy + 1``. The choice and reason are in ``.notes``.
    """
    if estimator not in MI_ESTIMATORS:
        from .._errors import nearest

        raise ValueError(
            f"estimator={estimator!r} is unknown; choose one of {list(MI_ESTIMATORS)} "
            f"(nearest: {nearest(str(estimator), MI_ESTIMATORS, 3)})"
        )
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    device = _device_of(x, y)
    x_raw, y_raw = x, y
    n, dx = _shape2(x, "x")
    dy = _shape2(y, "y")[1]
    picked = estimator
    if estimator == "auto":
        picked, why = _auto_mi(x_raw, y_raw, n, dx, dy, device)
        notes.append(f"auto picked {picked!r}: {why}")
    if picked == "mixed":
        which = opts.pop("discrete", None)
        if which is None:
            which = "y" if (_is_discrete_dtype(y_raw) and not _is_discrete_dtype(x_raw)) else "x"
        if which not in ("x", "y"):
            raise ValueError(f"discrete must be 'x' or 'y' (the discrete argument); got {which!r}")
        other = "y" if which == "x" else "x"
        lab = _as_2d(x_raw if which == "x" else y_raw, which, discrete=True)
        cont = _as_2d(y_raw if which == "x" else x_raw, other)
        if lab.shape[0] != cont.shape[0]:
            raise ValueError(
                f"x and y must hold the same number of samples; got {lab.shape[0]} and "
                f"{cont.shape[0]}"
            )
        x, y = lab, cont
    else:
        x, y = _pair(x_raw, y_raw, discrete=picked == "plugin")
    if picked == "ksg":
        picked = "ksg1"
    n_subsets = int(opts.pop("n_subsets", 10))
    n_boot = int(opts.pop("n_boot", 200))
    details: dict = {}

    if picked in ("ksg1", "ksg2"):
        variant = int(opts.pop("variant", 1 if picked == "ksg1" else 2))
        knn = _knn_opts(opts, device)
        _no_left(opts, picked)
        val, se, settings, details = _mi_ksg(
            x,
            y,
            k=k,
            variant=variant,
            standardize=standardize,
            stderr=stderr,
            rng=rng,
            knn=knn,
            n_subsets=n_subsets,
            notes=notes,
        )
        picked = f"ksg{variant}"
    elif picked == "copula_ksg":
        variant = int(opts.pop("variant", 1))
        n_sur = int(opts.pop("n_surrogates", 1))
        knn = _knn_opts(opts, device, metric="auto")
        _no_left(opts, picked)
        val, se, settings, details = _mi_copula_ksg(
            x,
            y,
            k=k,
            variant=variant,
            stderr=stderr,
            rng=rng,
            knn=knn,
            n_subsets=n_subsets,
            n_surrogates=n_sur,
            notes=notes,
        )
    elif picked == "pca_copula_ksg":
        variant = int(opts.pop("variant", 1))
        n_sur = int(opts.pop("n_surrogates", 1))
        comps = opts.pop("components", _PCA_COMPONENTS)
        var = opts.pop("variance", _PCA_VARIANCE)
        knn = _knn_opts(opts, device, metric="auto")
        _no_left(opts, picked)
        val, se, settings, details = _mi_pca_copula_ksg(
            x,
            y,
            k=k,
            variant=variant,
            stderr=stderr,
            rng=rng,
            knn=knn,
            n_subsets=n_subsets,
            n_surrogates=n_sur,
            notes=notes,
            components=comps,
            variance=var,
        )
    elif picked in ("gaussian", "copula"):
        bias_correct = bool(opts.pop("bias_correct", True))
        _no_left(opts, picked)
        _check_gaussian_n(n, dx + dy, picked)
        if picked == "copula":
            x, y = _copula(x), _copula(y)
        val, rho = _gaussian_mi_value(x, y, bias_correct)
        details = {"canonical_correlations": rho}
        se_method = _resolve_stderr(stderr, "bootstrap", ("bootstrap", "analytic"), picked)
        se = float("nan")
        if se_method == "bootstrap":
            se = _bootstrap_se(
                lambda a, c: _gaussian_mi_value(a, c, bias_correct)[0], (x, y), n_boot, rng
            )
        elif se_method == "analytic":
            # delta method: Var ρ̂_i ≈ (1 − ρ_i²)² / N and dI/dρ_i = ρ_i / (1 − ρ_i²)
            se = float(np.sqrt(np.sum(rho**2) / n))
        settings = {
            "bias_correct": bias_correct,
            "transform": "copula-normal scores" if picked == "copula" else "none",
            "stderr": se_method,
            **({"n_boot": n_boot} if se_method == "bootstrap" else {}),
        }
        if picked == "gaussian":
            notes.append(
                "the Gaussian estimator measures only linear (second-order) dependence; it "
                "is exact for jointly Gaussian data and otherwise neither a lower nor an "
                "upper bound in general"
            )
    elif picked == "plugin":
        mm = bool(opts.pop("miller_madow", False))
        _no_left(opts, picked)
        lx, kx = _symbols(x)
        ly, ky = _symbols(y)
        val = _plugin_mi_value(lx, ly, mm)
        se_method = _resolve_stderr(stderr, "bootstrap", ("bootstrap",), picked)
        se = float("nan")
        if se_method == "bootstrap":
            se = _bootstrap_se(lambda a, c: _plugin_mi_value(a, c, mm), (lx, ly), n_boot, rng)
        settings = {"miller_madow": mm, "stderr": se_method, "symbols": (kx, ky)}
        if se_method == "bootstrap":
            settings["n_boot"] = n_boot
        if max(kx, ky) > n / 5:
            notes.append(
                f"{max(kx, ky)} distinct symbols for N = {n} samples: the plug-in estimate "
                "is biased upward (try miller_madow=True, or more samples)"
            )
        details = {"bound": math.log(min(kx, ky))}
    elif picked == "mixed":
        variant_k = 3 if k is None else k
        knn = _knn_opts(opts, device)
        if knn.pop("metric") != "max":
            raise ValueError("the mixed estimator supports metric='max' only")
        _no_left(opts, picked)
        labels, kx = _symbols(x)
        val, se, settings, details = _mi_mixed(
            labels,
            y,
            k=variant_k,
            standardize=standardize,
            stderr=stderr,
            rng=rng,
            knn=knn,
            n_subsets=n_subsets,
            notes=notes,
        )
        settings["discrete"] = which
        details["bound"] = math.log(kx)
    elif picked in ("infonce", "smile"):
        from ._neural import neural_mi

        if standardize:
            x, y = _standardize(x), _standardize(y)
        val, se, settings, details, nnotes = neural_mi(
            x, y, kind=picked, stderr=stderr, seed=seed, device=device, **opts
        )
        notes.extend(nnotes)
    else:  # pragma: no cover - guarded above
        raise AssertionError(picked)

    if picked not in ("ksg1", "ksg2", "infonce", "smile"):
        settings.setdefault("standardize", bool(standardize))
    ceilings: list[tuple[float, str]] = []
    tol = 1e-3
    if picked in _KNN_ESTIMATORS:
        ceilings.append(
            (math.log(n), f"log N (N = {n} samples; what nearest-neighbour counts can resolve)")
        )
    if picked == "mixed":
        kx = len(np.unique(x, axis=0))
        ceilings.append((math.log(kx), f"log K (the discrete argument takes K = {kx} values)"))
        tol = max(tol, (kx - 1) / n)  # ψ(N) − ⟨ψ(N_ℓ)⟩ ≈ log K + (K − 1)/(2N)
    if picked == "plugin":
        kmin = int(min(settings["symbols"]))
        ceilings.append((math.log(kmin), f"log K (the smaller side takes K = {kmin} values)"))
    raw = float(val)
    val, ceiling, at_bound, failed = _apply_ceiling(raw, ceilings, tol, notes)
    if at_bound:
        details = {**details, "raw_value": raw}
        if failed:
            from .._errors import warn

            warn(notes[-1], InfoWarning)
    return InfoResult(
        value=float(val),
        stderr=float(se),
        estimator=picked,
        settings=settings,
        n=n,
        notes=tuple(notes),
        details=details,
        upper_bound=ceiling,
        bound=at_bound,
    )


def _no_left(opts: dict, name: str) -> None:
    if opts:
        raise TypeError(
            f"unexpected option(s) {sorted(opts)} for estimator {name!r}; see "
            "help(condpost.info.mutual_information) for the options each estimator takes"
        )


# --------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------

ENTROPY_ESTIMATORS = ("auto", "kl", "gaussian", "plugin")


def _kl_value(z: np.ndarray, k: int, knn: dict) -> float:
    """Kozachenko–Leonenko: ``ψ(N) − ψ(k) + log V_d + (d/N) Σ log r_i`` (Euclidean).

    Kozachenko & Leonenko (1987), Probl. Inf. Transm. 23:95; Kraskov et al. (2004) eq. 20.
    ``r_i`` is the distance to the k-th nearest other sample, ``V_d`` the unit-ball volume.
    """
    n, d = z.shape
    r, _ = _knn.kth_distance(z, k, **knn)
    if np.any(r <= 0):
        raise ValueError(
            f"{int(np.sum(r <= 0))} sample(s) of x have {k} or more exact duplicates; the "
            "Kozachenko-Leonenko estimator needs continuous data. Use estimator='plugin' "
            "for discrete data."
        )
    return float(digamma(n) - digamma(k) + _knn.log_unit_ball_volume(d) + d * np.mean(np.log(r)))


def _gaussian_h_value(z: np.ndarray, bias_correct: bool) -> float:
    n, d = z.shape
    cov = np.atleast_2d(np.cov(z, rowvar=False))
    sign, ld = np.linalg.slogdet(cov)
    if sign <= 0:
        raise ValueError("x has a singular covariance; drop linearly dependent columns")
    if bias_correct:
        ld -= _logdet_bias(d, n)
    return float(0.5 * (d * math.log(2 * math.pi * math.e) + ld))


def entropy(
    x: Any,
    estimator: str = "auto",
    *,
    k: int | None = None,
    standardize: bool = True,
    stderr: str | None = "auto",
    seed: int = 0,
    **opts: Any,
) -> InfoResult:
    r"""Entropy of ``x`` in nats: differential ``h(X)`` (continuous) or ``H(X)`` (discrete).

    Parameters
    ----------
    x : array ``[N]`` or ``[N, d]`` (numpy or torch)
    estimator : {"auto", "kl", "gaussian", "plugin"}
        ``kl``: Kozachenko–Leonenko kNN; ``gaussian``: ``½ log det(2πe Σ̂)`` with the
        Misra et al. (2005) bias correction; ``plugin``: ``−Σ p̂ log p̂`` over distinct rows
        (option ``miller_madow``: ``+ (K − 1)/(2N)``). ``auto``: ``plugin`` for integer/bool
        dtype, else ``kl``.
    k : int, optional
        Neighbour order for ``kl`` (default 5).
    standardize : bool
        For ``kl``: estimate on per-coordinate standardised data and add back
        ``Σ_j log s_j`` (``h(aX) = h(X) + log|a|``), so the value is the entropy of ``x``
        as given. Entropy is *not* scale invariant.
    stderr : {"auto", "subsample", "bootstrap", None}
        ``auto``: subsample for ``kl``, bootstrap otherwise.
    """
    if estimator not in ENTROPY_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is unknown; choose one of {ENTROPY_ESTIMATORS}")
    rng = np.random.default_rng(seed)
    notes: list[str] = []
    device = _device_of(x)
    picked = estimator
    if estimator == "auto":
        picked = "plugin" if _is_discrete_dtype(x) else "kl"
        notes.append(
            f"auto picked {picked!r}: "
            + ("integer/bool dtype" if picked == "plugin" else "continuous data")
        )
    z = _as_2d(x, "x", discrete=picked == "plugin")
    n, d = z.shape
    n_subsets = int(opts.pop("n_subsets", 10))
    n_boot = int(opts.pop("n_boot", 200))
    details: dict = {}
    if picked == "kl":
        k = _check_k(5 if k is None else k, n)
        knn = {
            "backend": opts.pop("backend", "auto"),
            "device": opts.pop("device", device),
            "block": opts.pop("block", None),
        }
        _no_left(opts, picked)
        offset = 0.0
        if standardize:
            s = z.std(0)
            z = (z - z.mean(0)) / s
            offset = float(np.sum(np.log(s)))
        val = _kl_value(z, k, knn) + offset
        se_method = _resolve_stderr(stderr, "subsample", ("subsample",), picked)
        se = float("nan")
        settings = {"k": k, "metric": "euclidean", "standardize": bool(standardize)}
        if se_method == "subsample":
            se, b = _subsample_se(lambda a: _kl_value(a, k, knn), (z,), n_subsets, rng, 5 * k)
            settings["n_subsets"] = b
        settings["stderr"] = se_method
        if d > 10:
            notes.append(
                f"d = {d}: Kozachenko-Leonenko has a bias that grows quickly with dimension; "
                "compare with estimator='gaussian'"
            )
    elif picked == "gaussian":
        bias_correct = bool(opts.pop("bias_correct", True))
        _no_left(opts, picked)
        if n <= d + 1:
            raise ValueError(f"the Gaussian entropy needs N > d + 1; got N = {n}, d = {d}")
        val = _gaussian_h_value(z, bias_correct)
        se_method = _resolve_stderr(stderr, "bootstrap", ("bootstrap",), picked)
        se = (
            _bootstrap_se(lambda a: _gaussian_h_value(a, bias_correct), (z,), n_boot, rng)
            if se_method == "bootstrap"
            else float("nan")
        )
        settings = {"bias_correct": bias_correct, "stderr": se_method}
    else:
        mm = bool(opts.pop("miller_madow", False))
        _no_left(opts, picked)
        labels, kk = _symbols(z)
        val = _plugin_h(labels, mm)
        se_method = _resolve_stderr(stderr, "bootstrap", ("bootstrap",), picked)
        se = (
            _bootstrap_se(lambda a: _plugin_h(a, mm), (labels,), n_boot, rng)
            if se_method == "bootstrap"
            else float("nan")
        )
        settings = {"miller_madow": mm, "stderr": se_method, "symbols": kk}
        details = {"bound": math.log(kk)}
    return InfoResult(
        value=float(val),
        stderr=float(se),
        estimator=picked,
        settings=settings,
        n=n,
        notes=tuple(notes),
        details=details,
    )


# --------------------------------------------------------------------------------------
# exact Gaussian-mixture MI (finite probe sets; docs/theory.md §4.4 ii)
# --------------------------------------------------------------------------------------


def _mixture_logpdf(b: torch.Tensor, mu: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``log N_k(b)`` for every point ``b [P, d]`` and component ``k``: ``[P, m]``."""
    m, d = mu.shape
    out = torch.empty(b.shape[0], m, dtype=b.dtype)
    half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    const = 0.5 * d * math.log(2 * math.pi)
    for j in range(m):
        r = (b - mu[j]).T  # [d, P]
        z = torch.linalg.solve_triangular(chol[j], r, upper=False)
        out[:, j] = -0.5 * (z * z).sum(0) - half_logdet[j] - const
    return out


def gaussian_mixture_mi(
    means: Any,
    covs: Any,
    weights: Any = None,
    *,
    method: str = "auto",
    nodes: int = 64,
    n_samples: int = 20_000,
    seed: int = 0,
) -> InfoResult:
    r"""Exact ``I(X;B)`` for ``X`` on ``m`` points and Gaussian ``B | X=x_j ~ N(μ_j, Σ_j)``.

    .. math::

        I(X;B) = \sum_j w_j\, \mathbb{E}_{b\sim N_j}\Big[\log N_j(b)
                 - \log \sum_k w_k N_k(b)\Big] \;\le\; H(w) \;(= \log m \text{ if uniform})

    (docs/theory.md §4.4 ii). Computed by tensor-product Gauss–Hermite quadrature per component
    when ``d ≤ 2`` (error estimate: difference between ``nodes`` and ``nodes/2``), else by
    stratified Monte Carlo with exact densities (``n_samples`` per component; standard
    error from the per-component sample variances).

    Parameters
    ----------
    means : ``[m, d]`` (or ``[m]`` for d = 1)
    covs : ``[m, d, d]``, ``[d, d]`` (shared), ``[m]`` (variances, d = 1), or a scalar
    weights : ``[m]`` probabilities of the probes (default uniform)
    method : {"auto", "quadrature", "mc"}
    """
    mu = torch.as_tensor(
        np.asarray(means, dtype=np.float64) if not torch.is_tensor(means) else means
    )
    mu = mu.detach().to(torch.float64).cpu()
    if mu.ndim == 1:
        mu = mu[:, None]
    m, d = mu.shape
    cv = torch.as_tensor(np.asarray(covs, dtype=np.float64) if not torch.is_tensor(covs) else covs)
    cv = cv.detach().to(torch.float64).cpu()
    if cv.ndim == 0:
        cv = cv * torch.eye(d).expand(m, d, d)
    elif cv.ndim == 1 and d == 1 and cv.shape[0] == m:
        cv = cv[:, None, None]
    elif cv.ndim == 2 and cv.shape == (d, d):
        cv = cv.expand(m, d, d)
    if cv.shape != (m, d, d):
        raise ValueError(
            f"covs must have shape [m, d, d] = [{m}, {d}, {d}], [d, d], [m] (d = 1) or be a "
            f"scalar; got {tuple(cv.shape)}"
        )
    for name, t in (("means", mu), ("covs", cv)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values")
    try:
        chol = torch.linalg.cholesky(0.5 * (cv + cv.transpose(-1, -2)))
    except RuntimeError as e:
        raise ValueError(
            "covs must be symmetric positive definite for every probe (a degenerate "
            "conditional law makes I(X;B) = H(X) exactly when the means differ); add a small "
            "jitter to the diagonal or drop the null directions"
        ) from e
    if weights is None:
        w = torch.full((m,), 1.0 / m, dtype=torch.float64)
    else:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64)).reshape(-1)
        if w.shape[0] != m or bool((w < 0).any()) or abs(float(w.sum()) - 1) > 1e-8:
            raise ValueError(f"weights must be {m} non-negative probabilities summing to 1")
    logw = torch.log(w)
    hx = float(-(w[w > 0] * logw[w > 0]).sum())
    if method == "auto":
        method = "quadrature" if d <= 2 else "mc"
    if method not in ("quadrature", "mc"):
        raise ValueError(f"method must be 'auto', 'quadrature' or 'mc'; got {method!r}")

    def term(b: torch.Tensor, j: int) -> torch.Tensor:
        lp = _mixture_logpdf(b, mu, chol)  # [P, m]
        return lp[:, j] - torch.logsumexp(lp + logw, dim=1)

    if method == "quadrature":

        def quad(nq: int) -> float:
            t, wt = np.polynomial.hermite.hermgauss(nq)
            grids = np.meshgrid(*([t] * d), indexing="ij")
            pts = torch.as_tensor(np.stack([g.reshape(-1) for g in grids], 1))  # [nq^d, d]
            wts = torch.as_tensor(np.prod(np.meshgrid(*([wt] * d), indexing="ij"), 0).reshape(-1))
            wts = wts / math.pi ** (d / 2)
            tot = 0.0
            for j in range(m):
                b = mu[j] + math.sqrt(2.0) * pts @ chol[j].T
                tot += float(w[j]) * float((wts * term(b, j)).sum())
            return tot

        val = quad(nodes)
        se = abs(val - quad(max(nodes // 2, 8)))
        settings = {"method": "gauss-hermite", "nodes": nodes, "stderr": "quadrature difference"}
    else:
        gen = torch.Generator().manual_seed(seed)
        means_j, vars_j = [], []
        for j in range(m):
            eps = torch.randn(n_samples, d, generator=gen, dtype=torch.float64)
            t = term(mu[j] + eps @ chol[j].T, j)
            means_j.append(float(t.mean()))
            vars_j.append(float(t.var()))
        val = float(np.dot(w.numpy(), means_j))
        se = float(math.sqrt(np.dot(w.numpy() ** 2, vars_j) / n_samples))
        settings = {"method": "stratified monte carlo", "n_samples": n_samples, "seed": seed}
        settings["stderr"] = "monte carlo"
    notes = []
    if val > hx + 4 * max(se, 1e-12):
        notes.append(f"estimate {val:.4f} exceeds the bound H(X) = {hx:.4f} (numerical error)")
    hbx = float(
        (
            w
            * (
                0.5 * d * math.log(2 * math.pi * math.e)
                + torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
            )
        ).sum()
    )
    return InfoResult(
        value=val,
        stderr=se,
        estimator="gaussian_mixture",
        settings=settings,
        n=m,
        notes=tuple(notes),
        details={"bound": hx, "h_b_given_x": hbx, "h_b": val + hbx},
    )
