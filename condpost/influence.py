"""Bayesian influence functions and susceptibilities from a reference class (docs/influence.md).

Everything here reads draws already taken: the per-sample losses ``ℓ_i(w)`` of a query
set are evaluated at each kept draw (batched over draws with the one "vmap, else loop"
helper, chunked over samples), and posterior covariances are estimated with Monte Carlo
standard errors from batch means within chains, pooled across chains.

* ``per_sample_losses(ref, query)``: ``ℓ_i(w)`` as ``[chains, draws, q]``;
* ``influence(ref, query, observable)``: ``Cov_π(ℓ_i, ℓ_j)`` (the Bayesian influence
  function, matrix form or top-k per query), or ``Cov_π(ℓ_i, O)``;
* ``susceptibility(ref, observable, groups)``: ``χ_g = −(nβ/n)·Cov_π(O, Σ_{i∈g} ℓ_i)``,
  the linear response of ``E_π[O]`` to up-weighting the samples of group ``g``;
* ``component_susceptibilities(post, components, groups)``: the same per component of
  the network (a head, a block of neurons), each sampled from its weight-refined
  posterior with the losses recorded along the chains: a components × groups table.

This module reads a ``ReferenceClass`` but never imports ``condpost.reference`` (the
class's thin ``influence`` and ``susceptibility`` methods import this module).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._batching import batched

if TYPE_CHECKING:  # pragma: no cover
    from .reference import ReferenceClass

__all__ = [
    "per_sample_losses",
    "influence",
    "susceptibility",
    "cov_with_stderr",
    "component_susceptibilities",
    "Influence",
    "Susceptibility",
    "ComponentSusceptibilities",
    "Contrast",
    "MATRIX_MAX",
]

#: largest query set for which ``influence`` returns the full ``q × q`` matrix
MATRIX_MAX = 2000


# --------------------------------------------------------------------------- draws
def _draw_index(S: int, max_draws: int | None, C: int) -> np.ndarray:
    """Evenly spaced draw indices per chain so that at most ``max_draws`` draws are kept
    in all (the same indices in every chain: the result stays ``[chains, draws']``)."""
    if max_draws is None or C * S <= max_draws:
        return np.arange(S)
    per = max(1, int(max_draws) // C)
    return np.unique(np.linspace(0, S - 1, per).round().astype(int))


def _flat_draws(ref: ReferenceClass, idx: np.ndarray, what: str) -> torch.Tensor:
    post = ref._need_posterior(what)
    draws = ref._need_draws(what)
    W = np.asarray(draws)[:, idx]
    return torch.as_tensor(
        np.ascontiguousarray(W).reshape(-1, ref.d), dtype=post.dtype, device=post.device
    )


def per_sample_losses(
    ref: ReferenceClass,
    query=None,
    *,
    max_draws: int | None = None,
    chunk: int = 4096,
    draw_chunk: int = 64,
) -> np.ndarray:
    """``ℓ_i(w)``, the per-sample negative log-likelihood, at each kept draw, ``[chains, draws, q]``.

    Parameters
    ----------
    ref : ReferenceClass
        Draws with the weights kept and the declaration attached.
    query : None or (x, y)
        The query set: the training data (default) or inputs and targets shaped like
        them (probe inputs, held-out samples).
    max_draws : int, optional
        Keep at most this many draws in all, evenly spaced within each chain (the same
        draw indices in every chain).
    chunk : int
        Query samples per evaluation; with ``draw_chunk`` draws per batched call, the
        intermediate memory is bounded by ``draw_chunk × chunk`` network outputs.
    draw_chunk : int
        Draws per batched (``torch.func.vmap``, else loop) call.

    Returns
    -------
    numpy.ndarray
        float64 ``[chains, draws', q]``; ``draws'`` is ``ref.num_draws`` unless
        ``max_draws`` thinned it.
    """
    from .infer.record import LossRecorder

    post = ref._need_posterior("per_sample_losses()")
    idx = _draw_index(ref.num_draws, max_draws, ref.chains)
    W = _flat_draws(ref, idx, "per_sample_losses()")
    rec = LossRecorder(post, query, chunk=chunk, what="query")
    out = rec.evaluate(W, draw_chunk=max(1, int(draw_chunk))).astype(np.float64, copy=False)
    q = rec.q
    return out.reshape(ref.chains, len(idx), q)


def _losses(ref: ReferenceClass, query, losses, max_draws, chunk):
    """``(ℓ [chains, draws', q], draw indices)``: given, recorded by the sampler
    (``record_losses=``; used for ``query=None`` when the training data were recorded,
    and for ``query="recorded"``), or evaluated at the kept draws."""
    rec = ref.records.get("losses") if ref.records else None
    info = ref.settings.get("record_losses") or {}
    use_rec = (
        losses is None
        and rec is not None
        and (
            (isinstance(query, str) and query == "recorded")
            or (query is None and info.get("query") == "train")
        )
    )
    if isinstance(query, str) and query == "recorded" and rec is None:
        raise ValueError(
            'query="recorded" needs per-sample losses recorded while sampling: '
            "post.sample(..., record_losses=True or (x, y))"
        )
    if use_rec:
        every = int(info.get("every", 1))
        rows = _draw_index(rec.shape[1], max_draws, ref.chains)
        return np.asarray(rec[:, rows], dtype=np.float64), rows * every
    idx = _draw_index(ref.num_draws, max_draws, ref.chains)
    if losses is not None:
        return losses, idx
    return per_sample_losses(ref, query, max_draws=max_draws, chunk=chunk), idx


# --------------------------------------------------------------------------- observables
def _observable(ref: ReferenceClass, observable, idx: np.ndarray, draw_chunk: int = 64):
    """Per-draw values ``[chains, draws']`` of a string, callable or array observable."""
    S = ref.num_draws
    if isinstance(observable, str):
        key = observable
        if key.startswith("defect:"):
            key = "defect/" + key[len("defect:") :]
        try:
            arr = ref.stat(key)
        except KeyError:
            names = [k for k in ref._stats if not k.startswith("sampler/")]
            raise ValueError(
                f"no per-draw statistic {observable!r}; this reference class records {names} "
                f'("loss" is L_n, "defect/<name>" a constraint\'s defect)'
            ) from None
        arr = np.asarray(arr, dtype=np.float64)
        if arr.ndim != 2 or arr.shape != (ref.chains, S):
            raise ValueError(
                f"statistic {observable!r} has shape {arr.shape}, not [chains, draws] = "
                f"{(ref.chains, S)}"
            )
        return arr[:, idx]
    if callable(observable):
        W = _flat_draws(ref, idx, "a callable observable")
        fn = batched(
            lambda w: torch.as_tensor(observable(w)).reshape(()),
            f"observable {getattr(observable, '__name__', type(observable).__name__)}",
        )
        with torch.no_grad():
            vals = torch.cat([fn(W[s : s + draw_chunk]) for s in range(0, W.shape[0], draw_chunk)])
        return vals.detach().cpu().double().numpy().reshape(ref.chains, len(idx))
    arr = np.asarray(observable, dtype=np.float64)
    if arr.shape != (ref.chains, S):
        raise ValueError(
            f"an observable array must have shape [chains, draws] = {(ref.chains, S)}; "
            f"got {arr.shape}"
        )
    return arr[:, idx]


# --------------------------------------------------------------------------- estimators
def _n_batches(S: int, batches: int | None) -> int:
    if batches is None:
        batches = int(round(np.sqrt(S)))
        batches = min(max(batches, 5), 20)
    return int(max(1, min(batches, S)))


def _batch_slices(S: int, B: int) -> list[slice]:
    b = S // B
    return [slice(k * b, (k + 1) * b) for k in range(B)] if b else [slice(0, S)]


def cov_with_stderr(
    a: np.ndarray, b: np.ndarray | None = None, *, batches: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Posterior covariance of per-draw values and its Monte Carlo standard error.

    ``a`` is ``[chains, draws, p]`` (or ``[chains, draws]``), ``b`` is ``[chains, draws, r]``
    (default: ``a``). Returns ``Cov[p, r]`` and its standard error ``[p, r]``.

    The covariance is the mean over all draws of ``(a − ā)(b − b̄)`` (centred at the
    pooled means, divided by ``N − 1``). Its standard error comes from batch means: each
    chain is cut into ``B`` contiguous batches (default ``√draws``, between 5 and 20);
    the batch means of the centred products, pooled over chains (``C·B`` of them), have
    sample variance ``v``, and ``se = √(v / (C·B))``. Batch means absorb the
    autocorrelation within a chain up to the batch length; pooling over chains keeps the
    number of degrees of freedom at ``C·B − 1``.
    """
    a = np.asarray(a, dtype=np.float64)
    same = b is None
    b = a if same else np.asarray(b, dtype=np.float64)
    squeeze_a, squeeze_b = a.ndim == 2, b.ndim == 2
    if squeeze_a:
        a = a[..., None]
    if squeeze_b:
        b = b[..., None]
    if a.ndim != 3 or b.ndim != 3 or a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"need [chains, draws, ·] arrays with the same chains and draws; got {a.shape} "
            f"and {b.shape}"
        )
    C, S = a.shape[:2]
    N = C * S
    if N < 4:
        raise ValueError(f"need at least 4 draws in all; got {N}")
    ac = a - a.reshape(N, -1).mean(0)
    bc = ac if same else b - b.reshape(N, -1).mean(0)
    slices = _batch_slices(S, _n_batches(S, batches))
    m1 = np.zeros((a.shape[2], b.shape[2]))
    m2 = np.zeros_like(m1)
    K = 0
    for c in range(C):
        for sl in slices:
            x, y = ac[c, sl], bc[c, sl]
            m = x.T @ y / x.shape[0]
            m1 += m
            m2 += m * m
            K += 1
    full = ac.reshape(N, -1).T @ bc.reshape(N, -1)
    cov = full / (N - 1)
    if K > 1:
        mean_b = m1 / K
        var_b = np.maximum(m2 / K - mean_b**2, 0.0) * K / (K - 1)
        se = np.sqrt(var_b / K)
    else:
        se = np.full_like(cov, np.nan)
    if squeeze_b:
        cov, se = cov[:, 0], se[:, 0]
    if squeeze_a:
        cov, se = cov[0], se[0]
    return cov, se


# --------------------------------------------------------------------------- results
@dataclass
class Influence:
    """Posterior covariances of per-sample losses, with Monte Carlo standard errors.

    * matrix form (``kind == "matrix"``): ``cov[i, j] = Cov_π(ℓ_i, ℓ_j)``, ``stderr``
      the same shape, ``q × q``;
    * top-k form (``kind == "topk"``): for each query ``i``, ``index[i]`` holds the ``k``
      samples ``j`` of largest ``|Cov_π(ℓ_i, ℓ_j)|``, ``cov[i]`` and ``stderr[i]`` their
      covariances and errors;
    * observable form (``kind == "observable"``): ``cov[i] = Cov_π(ℓ_i, O)``, ``[q]``.

    ``response`` is ``−(nβ/n)·cov``: the linear response of ``E_π[ℓ_j]`` (or of
    ``E_π[O]``) to up-weighting sample ``i`` by ``ε`` (docs/influence.md).
    """

    cov: np.ndarray
    stderr: np.ndarray
    kind: str
    nbeta: float
    n: int
    index: np.ndarray | None = None
    draws: int = 0
    settings: dict = field(default_factory=dict)

    @property
    def response(self) -> np.ndarray:
        return -(self.nbeta / self.n) * self.cov

    @property
    def z(self) -> np.ndarray:
        """``cov / stderr``: how many standard errors each entry is from zero."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.cov / self.stderr

    def correlation(self) -> np.ndarray:
        """Matrix form only: ``Corr_π(ℓ_i, ℓ_j)`` from the covariance matrix."""
        if self.kind != "matrix":
            raise ValueError("correlation() needs the matrix form (q ≤ MATRIX_MAX)")
        sd = np.sqrt(np.clip(np.diag(self.cov), 0, None))
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.cov / np.outer(sd, sd)

    def __repr__(self) -> str:
        return (
            f"Influence({self.kind}, shape={tuple(self.cov.shape)}, draws={self.draws}, "
            f"median |z|={float(np.nanmedian(np.abs(self.z))):.3g})"
        )


@dataclass(frozen=True)
class Contrast:
    """``χ_a − χ_b`` (or ``|χ_a| − |χ_b|``) with the Monte Carlo standard error of the
    difference itself (computed from the per-draw difference of the two group sums, so
    the correlation between the two estimates is accounted for)."""

    value: float
    stderr: float
    a: str
    b: str
    absolute: bool = False

    @property
    def z(self) -> float:
        """``value / stderr``: the difference in standard errors."""
        return self.value / self.stderr if self.stderr > 0 else float("nan")

    def __str__(self) -> str:
        bar = "|" if self.absolute else ""
        return (
            f"{bar}χ_{self.a}{bar} − {bar}χ_{self.b}{bar} = {self.value:.4g} ± "
            f"{self.stderr:.2g} (MC s.e.), z = {self.z:.2f}"
        )


@dataclass
class Susceptibility:
    """``χ_g = −(nβ/n)·Cov_π(O, Σ_{i∈g} ℓ_i)`` per group, with Monte Carlo standard errors."""

    values: dict[str, float]
    stderr: dict[str, float]
    cov: dict[str, float]
    sizes: dict[str, int]
    nbeta: float
    n: int
    draws: int = 0
    # per-draw group sums [chains, draws, groups] and observable [chains, draws], kept for
    # contrasts between groups (small: one number per draw and group)
    sums: np.ndarray | None = field(default=None, repr=False)
    observable: np.ndarray | None = field(default=None, repr=False)
    batches: int | None = field(default=None, repr=False)

    def __getitem__(self, name: str) -> float:
        return self.values[name]

    def z(self, name: str) -> float:
        return self.values[name] / self.stderr[name]

    def contrast(self, a: str, b: str, *, absolute: bool = False) -> Contrast:
        """``χ_a − χ_b`` with the standard error of the difference.

        The two estimates share the draws (and, for overlapping groups, samples), so
        their errors are correlated: the error here is the batch-means error of
        ``−(nβ/n)·Cov(O, Σ_a ℓ − Σ_b ℓ)``, not ``√(se_a² + se_b²)``. With
        ``absolute=True`` the value is ``|χ_a| − |χ_b|``; its error is that of
        ``χ_a − χ_b`` when the two have the same sign and that of ``χ_a + χ_b`` when they
        do not (first order in the errors).
        """
        if self.sums is None or self.observable is None:
            raise ValueError(
                "contrast() needs the per-draw sums (a Susceptibility from susceptibility())"
            )
        names = list(self.values)
        for g in (a, b):
            if g not in self.values:
                raise KeyError(f"no group {g!r}; groups are {names}")
        ia, ib = names.index(a), names.index(b)
        va, vb = self.values[a], self.values[b]
        sign = 1.0
        if absolute and np.sign(va) != np.sign(vb):
            sign = -1.0  # |χ_a| − |χ_b| = ±(χ_a + χ_b)
        diff = self.sums[..., ia] - sign * self.sums[..., ib]
        _, se = cov_with_stderr(diff, self.observable, batches=self.batches)
        f = self.nbeta / self.n
        value = abs(va) - abs(vb) if absolute else va - vb
        return Contrast(float(value), float(f * se), str(a), str(b), absolute)

    def __str__(self) -> str:
        w = max([5, *(len(k) for k in self.values)])
        lines = [f"{'group'.rjust(w)}  {'size':>6}  {'chi':>11}  {'stderr':>9}  {'z':>6}"]
        for k, v in self.values.items():
            se = self.stderr[k]
            z = v / se if se > 0 else float("nan")
            lines.append(f"{k.rjust(w)}  {self.sizes[k]:>6}  {v:>11.4g}  {se:>9.2g}  {z:>6.2f}")
        return "\n".join(lines)

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "chi": self.values,
                "stderr": self.stderr,
                "z": {k: self.z(k) if self.stderr[k] > 0 else np.nan for k in self.values},
                "cov": self.cov,
                "size": self.sizes,
            }
        )


# --------------------------------------------------------------------------- public API
def _topk_rows(L: np.ndarray, k: int, batches: int | None, rows: int = 256):
    """Top-``k`` partners per query by ``|Cov(ℓ_i, ℓ_j)|``, in blocks of ``rows`` queries."""
    q = L.shape[2]
    k = int(min(k, q))
    index = np.empty((q, k), dtype=np.int64)
    cov = np.empty((q, k))
    se = np.empty((q, k))
    for a in range(0, q, rows):
        c, s = cov_with_stderr(L[..., a : a + rows], L, batches=batches)
        part = np.argpartition(-np.abs(c), k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(c, part, 1)
        order = np.argsort(-np.abs(vals), axis=1)
        part = np.take_along_axis(part, order, 1)
        index[a : a + rows] = part
        cov[a : a + rows] = np.take_along_axis(c, part, 1)
        se[a : a + rows] = np.take_along_axis(s, part, 1)
    return index, cov, se


def influence(
    ref: ReferenceClass,
    query=None,
    observable=None,
    *,
    k: int = 20,
    matrix: bool | None = None,
    max_draws: int | None = None,
    batches: int | None = None,
    losses: np.ndarray | None = None,
    chunk: int = 4096,
) -> Influence:
    """The Bayesian influence function: posterior covariances of per-sample losses.

    Parameters
    ----------
    ref : ReferenceClass
        Draws with the weights kept and the declaration attached.
    query : None or (x, y)
        The query set (default: the training data).
    observable : None, str, callable or array
        None: ``Cov_π(ℓ_i, ℓ_j)`` between query samples. Else ``Cov_π(ℓ_i, O)`` for the
        observable ``O``: per-draw values ``[chains, draws]``, the name of a recorded
        statistic (``"loss"`` for ``L_n``, ``"defect/<name>"``), or a callable of the
        flat lifted weights ``w`` (a torch tensor ``[d]``) returning a scalar.
    k : int
        Partners per query in the top-k form.
    matrix : bool, optional
        Full ``q × q`` matrix (default when ``q ≤ MATRIX_MAX``) or top-k per query.
    max_draws : int, optional
        Thin to at most this many draws in all (evenly within chains).
    batches : int, optional
        Batches per chain for the standard errors (default ``√draws``, 5 to 20).
    losses : numpy.ndarray, optional
        Per-sample losses already computed by ``per_sample_losses`` (same ``max_draws``).
    """
    L, idx = _losses(ref, query, losses, max_draws, chunk)
    if L.shape[:2] != (ref.chains, len(idx)):
        raise ValueError(f"losses have shape {L.shape}; expected [{ref.chains}, {len(idx)}, q]")
    n = int(ref.config["n"])
    meta = {"draws": int(L.shape[0] * L.shape[1])}
    if observable is not None:
        O = _observable(ref, observable, idx)
        cov, se = cov_with_stderr(L, O, batches=batches)
        return Influence(cov, se, "observable", ref.nbeta, n, **meta)
    q = L.shape[2]
    if matrix is None:
        matrix = q <= MATRIX_MAX
    if matrix:
        cov, se = cov_with_stderr(L, batches=batches)
        return Influence(cov, se, "matrix", ref.nbeta, n, **meta)
    index, cov, se = _topk_rows(L, k, batches)
    return Influence(cov, se, "topk", ref.nbeta, n, index=index, **meta)


def susceptibility(
    ref: ReferenceClass,
    observable,
    groups: Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
    *,
    query=None,
    max_draws: int | None = None,
    batches: int | None = None,
    losses: np.ndarray | None = None,
    chunk: int = 4096,
) -> Susceptibility:
    """``χ_g = −(nβ/n)·Cov_π(O, Σ_{i∈g} ℓ_i)`` for each group ``g`` of query samples.

    ``χ_g`` is ``d E_π[O] / d ε_g``: the linear response of the posterior mean of ``O``
    when each sample of ``g`` gets weight ``1 + ε_g`` in ``nβ·L_n`` (docs/influence.md).

    Parameters
    ----------
    ref : ReferenceClass
        Draws with the weights kept and the declaration attached.
    observable : str, callable or array
        As in ``influence``: ``"loss"``, ``"defect/<name>"``, any recorded statistic, a
        callable of the flat weights, or per-draw values ``[chains, draws]``.
    groups : dict name → indices (or a list of index lists, named "0", "1", ...)
        Indices into the query set (default: the training samples).
    """
    if not isinstance(groups, Mapping):
        groups = {str(i): g for i, g in enumerate(groups)}
    if not groups:
        raise ValueError("groups is empty")
    L, idx = _losses(ref, query, losses, max_draws, chunk)
    q = L.shape[2]
    sums, sizes = [], {}
    for name, g in groups.items():
        g = np.asarray(g, dtype=np.int64).reshape(-1)
        if g.size and (g.min() < -q or g.max() >= q):
            raise IndexError(f"group {name!r} has indices outside the query set of {q} samples")
        sums.append(L[..., g].sum(-1))
        sizes[str(name)] = int(g.size)
    G = np.stack(sums, -1)  # [C, S, groups]
    O = _observable(ref, observable, idx)
    cov, se = cov_with_stderr(G, O, batches=batches)
    n = int(ref.config["n"])
    f = ref.nbeta / n
    names = list(sizes)
    return Susceptibility(
        values={nm: float(-f * cov[i]) for i, nm in enumerate(names)},
        stderr={nm: float(f * se[i]) for i, nm in enumerate(names)},
        cov={nm: float(cov[i]) for i, nm in enumerate(names)},
        sizes=sizes,
        nbeta=ref.nbeta,
        n=n,
        draws=int(G.shape[0] * G.shape[1]),
        sums=G,
        observable=np.asarray(O, dtype=np.float64),
        batches=batches,
    )


# --------------------------------------------------------------------------- per component
@dataclass
class ComponentSusceptibilities:
    """Susceptibilities per component of the network (rows) and group of samples (columns).

    ``chi[c, g]`` is ``χ_g`` of the observable under the weight-refined posterior of
    component ``c`` (only its weights sampled, the rest at ``w*``), ``stderr`` its Monte
    Carlo standard error, ``z = chi / stderr``. ``results[c]`` is the component's
    ``Susceptibility`` (``.contrast(a, b)`` compares two groups with the error of the
    difference); ``dims[c]`` the number of weights sampled; ``notes[c]`` what was
    special about a component (a constraint that does not depend on its weights).
    """

    components: list[str]
    groups: list[str]
    chi: np.ndarray
    stderr: np.ndarray
    sizes: dict[str, int]
    dims: dict[str, int]
    observable: str
    method: str
    results: dict[str, Susceptibility] = field(default_factory=dict, repr=False)
    notes: dict[str, str] = field(default_factory=dict)
    refs: dict = field(default_factory=dict, repr=False)

    @property
    def z(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.chi / self.stderr

    def __getitem__(self, key) -> float:
        """``table[component, group]`` → χ."""
        c, g = key
        return float(self.chi[self.components.index(c), self.groups.index(g)])

    def contrast(self, component: str, a: str, b: str, *, absolute: bool = False) -> Contrast:
        """``χ_a − χ_b`` (or ``|χ_a| − |χ_b|``) within one component, with the error of
        the difference (``Susceptibility.contrast``)."""
        if component not in self.results:
            raise KeyError(f"no component {component!r}; components are {self.components}")
        res = self.results[component]
        if res.sums is None:
            raise ValueError(f"component {component!r}: {self.notes.get(component, 'no draws')}")
        return res.contrast(a, b, absolute=absolute)

    def to_dataframe(self):
        """Long format: index (component, group), columns chi, stderr, z, size, d.
        ``df["chi"].unstack()`` is the components × groups matrix."""
        import pandas as pd

        rows = []
        for i, c in enumerate(self.components):
            for j, g in enumerate(self.groups):
                se = self.stderr[i, j]
                rows.append(
                    {
                        "component": c,
                        "group": g,
                        "chi": self.chi[i, j],
                        "stderr": se,
                        "z": self.chi[i, j] / se if se > 0 else np.nan,
                        "size": self.sizes[g],
                        "d": self.dims[c],
                    }
                )
        return pd.DataFrame(rows).set_index(["component", "group"])

    def __str__(self) -> str:
        cells = [
            [f"{self.chi[i, j]:.3g} ± {self.stderr[i, j]:.2g}" for j in range(len(self.groups))]
            for i in range(len(self.components))
        ]
        heads = [f"{g} (n={self.sizes[g]})" for g in self.groups]
        wc = max([9, *(len(c) for c in self.components)])
        wd = max([1, *(len(str(v)) for v in self.dims.values())])
        widths = [max(len(h), *(len(r[j]) for r in cells)) for j, h in enumerate(heads)]
        out = [
            f"χ of {self.observable!r} per component (weight-refined {self.method}), "
            f"± Monte Carlo s.e.",
            f"{'component'.ljust(wc)}  {'d'.rjust(wd)}  "
            + "  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True)),
        ]
        for i, c in enumerate(self.components):
            out.append(
                f"{c.ljust(wc)}  {str(self.dims[c]).rjust(wd)}  "
                + "  ".join(v.rjust(w) for v, w in zip(cells[i], widths, strict=True))
            )
        for c, note in self.notes.items():
            out.append(f"note: {c}: {note}")
        return "\n".join(out)


_INDEPENDENT = "does not depend on any lifted parameter"


def _refined_with_constraints(post, include):
    """The weight-refined declaration of one component, with the constraints of ``post``
    re-bound to it. A constraint whose feature does not depend on the component's
    weights (no autograd path, or a gradient that is zero at ``w*`` and nearby) is a
    constant there, its defect 0 at every draw: it is left out, and its name returned."""
    import warnings

    def declare(specs):
        rp = post.refined(include=include)
        for spec in specs:
            rp.preserve(spec)
        return rp

    rp = post.refined(include=include)
    kept, constant = [], []
    for b in post.constraints:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rp.preserve(b.spec)
            except ValueError as e:
                if _INDEPENDENT not in str(e):
                    raise
                constant.append(b.name)
                continue
        if any(_INDEPENDENT in str(w.message) for w in caught):
            constant.append(b.name)
        else:
            kept.append(b.spec)
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if constant and len(rp.constraints) != len(kept):
        rp = declare(kept)  # without the constant ones (each would cost a forward per step)
    return rp, constant


def component_susceptibilities(
    post,
    components,
    groups: Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
    *,
    observable="loss",
    method: str = "sgld",
    query=None,
    batches: int | None = None,
    keep_refs: bool = False,
    **sample_kw,
) -> ComponentSusceptibilities:
    """Susceptibilities per component: each component sampled on its own, weights refined.

    For each component ``c`` (a selection of weights: a head, a block of MLP neurons, a
    layer), the weight-refined declaration ``slt.refined_posterior(post, include=sel)``
    lifts only those weights (the rest stay at ``w*``), carries over ``post``'s
    constraints, and is sampled with ``method`` and the per-sample losses recorded along
    the chains (``record_losses``, ``keep_draws=False``: the draws are not kept). Then
    ``χ_g = −(nβ/n)·Cov_π_c(O, Σ_{i∈g} ℓ_i)`` for each group ``g``, with batch-means
    standard errors (``susceptibility``). This is the per-component analysis of Baker et
    al. 2025 (arXiv:2504.18274): an observable localized on a component, fluctuated by a
    posterior over that component's weights (docs/influence.md).

    Parameters
    ----------
    post : LocalPosterior
        The declaration (data, likelihood, nβ, γ, constraints).
    components : dict name → selection, or a list of selections
        ``include=`` selections (``condpost.models.heads(0, 1)``, ``neurons(0, slice(0,
        32))``, glob patterns, ``"blocks.0.attn.W_Q[1]"``). ``None`` is ``post``'s own
        selection (the whole lifted network, as a reference row). A list is named by
        ``str`` of each selection.
    groups : dict name → indices (or a list of index lists)
        Indices into the query set (default: the training samples).
    observable : str or callable
        A recorded per-draw statistic: ``"loss"`` (``L_n``), ``"defect/<name>"`` (a
        constraint's defect), ``"virial"``; or a callable ``(ref, component) → [chains,
        draws]`` evaluated on each component's reference class. The defect of a
        constraint that does not depend on a component's weights is 0 at every draw: its
        χ is exactly 0 there (stderr 0, and a note).
    method : str
        A torch sampler that records losses (the SG-MCMC methods, ``"mala"``, a
        registered kernel).
    query : None or (x, y)
        The recorded query set (default: the training data).
    batches : int, optional
        Batches per chain for the standard errors.
    keep_refs : bool
        Keep each component's ``ReferenceClass`` in ``.refs`` (with its recorded losses,
        ``[chains, draws', q]`` each).
    **sample_kw
        Go to ``LocalPosterior.sample`` (``chains``, ``warmup``, ``draws``, ``step_size``,
        ``batch_size``, ``record_every``, ``seed``, ``store`` is not supported here).
    """
    if isinstance(components, Mapping):
        comps = {str(k): v for k, v in components.items()}
    else:
        comps = {str(v): v for v in components}
    if not comps:
        raise ValueError("components is empty")
    if not isinstance(groups, Mapping):
        groups = {str(i): g for i, g in enumerate(groups)}
    groups = {str(k): v for k, v in groups.items()}
    if not groups:
        raise ValueError("groups is empty")
    for k in ("record_losses", "store"):
        if k in sample_kw:
            raise TypeError(
                f"component_susceptibilities sets {k} itself (record_losses from query=; "
                f"no store): remove {k}= from the sampler options"
            )
    if isinstance(observable, str) and observable.startswith("defect:"):
        observable = "defect/" + observable[len("defect:") :]
    if not (isinstance(observable, str) or callable(observable)):
        raise TypeError(
            "observable must be the name of a recorded statistic ('loss', 'defect/<name>') "
            f"or a callable (ref, component) -> [chains, draws]; got {type(observable).__name__}"
        )
    sample_kw.setdefault("keep_draws", False)
    record = True if query is None else query
    obs_label = (
        observable if isinstance(observable, str) else getattr(observable, "__name__", "callable")
    )

    C, G = len(comps), len(groups)
    chi = np.zeros((C, G))
    se = np.zeros((C, G))
    results: dict[str, Susceptibility] = {}
    dims: dict[str, int] = {}
    notes: dict[str, str] = {}
    refs: dict = {}
    sizes = {g: int(np.asarray(idx).size) for g, idx in groups.items()}
    defect = (
        observable[len("defect/") :]
        if isinstance(observable, str) and observable.startswith("defect/")
        else None
    )
    q = "recorded" if query is not None else None
    for i, (name, sel) in enumerate(comps.items()):
        rp, constant = _refined_with_constraints(post, sel)
        dims[name] = int(rp.d)
        if defect is not None and defect in constant:
            # D ≡ 0 on this component: χ = 0 exactly, nothing to sample
            notes[name] = (
                f"constraint {defect!r} does not depend on this component's weights: its "
                f"defect is 0 at every draw, so χ = 0 exactly (not sampled)"
            )
            results[name] = Susceptibility(
                values=dict.fromkeys(groups, 0.0),
                stderr=dict.fromkeys(groups, 0.0),
                cov=dict.fromkeys(groups, 0.0),
                sizes=dict(sizes),
                nbeta=rp.nbeta,
                n=rp.n,
            )
            continue
        ref = rp.sample(method, record_losses=record, **sample_kw)
        if keep_refs:
            refs[name] = ref
        obs = observable(ref, name) if callable(observable) else observable
        res = susceptibility(ref, obs, groups, query=q, batches=batches)
        results[name] = res
        for j, g in enumerate(res.values):
            chi[i, j] = res.values[g]
            se[i, j] = res.stderr[g]
    return ComponentSusceptibilities(
        components=list(comps),
        groups=list(groups),
        chi=chi,
        stderr=se,
        sizes=sizes,
        dims=dims,
        observable=str(obs_label),
        method=method,
        results=results,
        notes=notes,
        refs=refs,
    )
