"""Figures of reference classes (matplotlib; the optional extra ``condpost[plots]``).

Every function draws one quantity in one unit per axis and returns the ``Axes`` it drew
on (a list of ``Axes`` where it draws several panels). Pass ``ax=`` to draw into an
existing figure; by default a new figure is made. Traces and rank plots go through
ArviZ (``az.plot_trace``, ``az.plot_rank``), which already draws them.

* ``trace`` and ``rank``: ``L_n`` and chosen coordinates of the draws, per chain;
* ``preservation``: the preservation report as a chart (binding ± s.e., coverage);
* ``binding``: a constraint's binding ratio against its tolerance;
* ``precision_curve``: λ̂, MI or any observable over the precision scale with error
  bars, several reference classes on shared axes (``SweepResult.plot`` per class).

The CLI (``condpost run``) saves these figures as PNG files with the Agg backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .reference import PreservationReport, ReferenceClass
    from .sweep import SweepResult

__all__ = ["trace", "rank", "preservation", "binding", "precision_curve", "loss_trace"]


def _plt():
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "condpost.plots needs matplotlib: `pip install condpost[plots]` (or matplotlib)"
        ) from e
    return plt


def _coords(ref: ReferenceClass, coords: Sequence[int] | None) -> dict[str, np.ndarray]:
    """``L_n`` and the chosen flat coordinates as ``{name: [chain, draw]}``."""
    out = {"L_n": np.asarray(ref.loss())}
    if coords:
        W = ref.flat()
        names, shapes = ref.config["lifted"]["names"], ref.config["lifted"]["shapes"]
        bounds = np.cumsum([0] + [int(np.prod(s)) if s else 1 for s in shapes])
        for c in coords:
            c = int(c)
            if not 0 <= c < ref.d:
                raise ValueError(f"coordinate {c} is outside the lifted vector [0, {ref.d})")
            i = int(np.searchsorted(bounds, c, side="right") - 1)
            out[f"w[{c}] ({names[i]}[{c - bounds[i]}])"] = np.asarray(W[:, :, c])
    return out


def _idata(ref: ReferenceClass, coords):
    import arviz as az

    return az.from_dict(posterior=_coords(ref, coords))


def trace(ref: ReferenceClass, coords: Sequence[int] | None = None, *, axes=None):
    """Trace plots (density and trace per chain, via ``az.plot_trace``) of ``L_n`` and of
    the flat coordinates ``coords`` of the lifted vector. Returns the ``[k, 2]`` array of
    ``Axes`` (one row per quantity, each in its own unit)."""
    import arviz as az

    _plt()
    return az.plot_trace(_idata(ref, coords), axes=axes, compact=False)


def rank(ref: ReferenceClass, coords: Sequence[int] | None = None, *, ax=None):
    """Rank plots per chain (``az.plot_rank``): uniform ranks mean mixed chains. Returns
    the array of ``Axes`` (one per quantity)."""
    import arviz as az

    _plt()
    if ref.chains < 2:
        raise ValueError("a rank plot compares chains: it needs at least 2 chains")
    return az.plot_rank(_idata(ref, coords), ax=ax)


def loss_trace(ref: ReferenceClass, *, ax=None):
    """``L_n`` per chain against the draw index, with ``L_n(w*)`` as a line. Returns the Axes."""
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    L = np.asarray(ref.loss())
    for c in range(L.shape[0]):
        ax.plot(L[c], lw=0.8, label=f"chain {c}")
    ax.axhline(float(ref.config["loss_center"]), color="k", ls=":", lw=1, label="L_n(w*)")
    ax.set_xlabel("draw")
    ax.set_ylabel("L_n (nats per sample)")
    if L.shape[0] <= 8:
        ax.legend(fontsize="small")
    return ax


def preservation(report: PreservationReport | ReferenceClass, *, ax=None):
    """The preservation report as a chart: per constraint, the binding ratio with its MC
    standard error and the coverage ``P(D_c ≤ τ_c)``, both fractions in [0, 1] on one
    axis, with the bands 0.05 and 0.95 where the report warns. Returns the Axes."""
    plt = _plt()
    if not hasattr(report, "rows"):
        report = report.preservation(warn_user=False)
    rows = report.rows
    if not rows:
        raise ValueError("the report has no constraints to chart")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 2), 3.2))
    x = np.arange(len(rows))
    b = np.array([r.get("binding", np.nan) for r in rows], dtype=float)
    se = np.array([r.get("binding_se", np.nan) for r in rows], dtype=float)
    cov = np.array([r.get("coverage", np.nan) for r in rows], dtype=float)
    ax.bar(x - 0.2, np.nan_to_num(b), 0.4, yerr=np.nan_to_num(se), capsize=3, label="binding")
    ax.bar(x + 0.2, np.nan_to_num(cov), 0.4, label="coverage P(D ≤ τ)")
    for lvl in (0.05, 0.95):
        ax.axhline(lvl, color="grey", ls=":", lw=1)
    ax.set_xticks(x, [r["constraint"] for r in rows], rotation=15, ha="right")
    top = np.nanmax(np.concatenate([b + np.nan_to_num(se), cov, [1.0]]))
    ax.set_ylim(0, 1.05 * top)
    ax.set_ylabel("fraction")
    ax.legend(fontsize="small")
    return ax


def binding(sweep: SweepResult, constraint: str | None = None, *, ax=None, **errorbar_kw):
    """A constraint's binding ratio against its tolerance σ (a tolerance sweep), or
    against the knob swept (nβ, γ) when the observable ``binding[<name>]`` was measured.
    Returns the Axes (binding ratio only)."""
    name = _binding_name(sweep, constraint)
    out = sweep.plot(ax=ax, names=[name], units={name: "binding ratio"}, **errorbar_kw)
    a = out if not isinstance(out, list) else out[0]
    for lvl in (0.05, 0.95):
        a.axhline(lvl, color="grey", ls=":", lw=1)
    if sweep.knob.startswith("tolerance:"):
        a.set_xlabel(f"tolerance σ of {sweep.knob.split(':', 1)[1]}")
    return a


def _binding_name(sweep, constraint):
    cands = [n for n in sweep.observables if n.startswith("binding")]
    if constraint is not None:
        cands = [n for n in cands if n in (constraint, f"binding[{constraint}]")]
    if len(cands) != 1:
        raise ValueError(
            f"name one binding observable: have {[n for n in sweep.observables]}"
            + (f" (constraint={constraint!r})" if constraint else "")
        )
    return cands[0]


def precision_curve(
    sweeps: SweepResult | Mapping[str, SweepResult],
    name: str,
    *,
    ax=None,
    unit: str | None = None,
    colors: Mapping[str, Any] | None = None,
    **errorbar_kw,
):
    """One observable (λ̂, MI, accuracy, ...) over the precision scale with error bars,
    one curve per reference class (``{label: SweepResult}``), on one axis in the
    observable's unit (``SweepResult.unit``; ``unit=`` overrides). ``colors`` maps a
    label to its colour (so a class keeps its colour across figures). Returns the Axes."""
    plt = _plt()
    if not isinstance(sweeps, Mapping):
        sweeps = {None: sweeps}
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.4))
    drawn = 0
    for label, res in sweeps.items():
        if name not in res.observables:
            continue
        kw: dict[str, Any] = dict(errorbar_kw)
        if label is not None:
            kw["label"] = label
        if colors and label in colors:
            kw.setdefault("color", colors[label])
        res.plot(ax=ax, names=[name], units={name: unit} if unit else None, **kw)
        drawn += 1
    if not drawn:
        raise ValueError(f"no sweep measured {name!r}")
    if drawn > 1 or None not in sweeps:
        ax.legend(fontsize="small")
    ax.set_title(name)
    return ax
