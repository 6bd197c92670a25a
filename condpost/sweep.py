"""Curves over the precision scale: sample a family of reference classes and measure on each.

Every information-theoretic (and most other) quantities of a reference class depend
on its precision scale ``(nβ, γ, σ_c)`` (docs/theory.md §3.4.6, §5.1), so they are reported as
curves. ``sweep`` varies one knob of a declared ``LocalPosterior`` (``nbeta``,
``localization``, or the tolerance of one constraint), samples each setting, and
evaluates observables (e.g. ``condpost.info.mutual_information``) with their error
bars. ``SweepResult.slope()`` gives ``dI/d log nβ`` by weighted least squares, a
candidate scale-free summary (docs/theory.md §3.4.6, [Proposal, untested]).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior
    from .reference import ReferenceClass

__all__ = ["sweep", "SweepResult", "Slope"]

_KNOBS = ("nbeta", "localization", "tolerance")


@dataclass(frozen=True)
class Slope:
    """Weighted least-squares slope ``d value / d log(knob)`` with its standard error.

    Fit ``y_k = c + s·log(x_k)`` with weights ``1/se_k²`` (ordinary least squares with a
    residual-based error when the observable has no standard errors). ``stderr`` is
    ``sqrt((XᵀWX)⁻¹)₁₁`` from the per-point errors; ``chi2``/``dof`` tell whether a
    straight line fits (``chi2/dof ≫ 1``: the curve bends over this range, and the
    slope is a range average). ``stderr_scaled`` multiplies by ``sqrt(max(1, chi2/dof))``.
    """

    value: float
    stderr: float
    intercept: float
    chi2: float
    dof: int
    stderr_scaled: float
    x: str
    observable: str
    range: tuple[float, float]

    def __float__(self) -> float:
        return float(self.value)

    def __str__(self) -> str:
        fit = (
            "a line through 2 points"
            if self.dof == 0
            else f"chi2/dof = {self.chi2:.3g}/{self.dof}"
            if np.isfinite(self.chi2)
            else f"unweighted, {self.dof} dof"
        )
        return (
            f"d[{self.observable}]/d {self.x} = {self.value:.4g} ± {self.stderr:.2g} over "
            f"[{self.range[0]:.4g}, {self.range[1]:.4g}] ({fit})"
        )


def _wls(x: np.ndarray, y: np.ndarray, se: np.ndarray | None):
    X = np.stack([np.ones_like(x), x], 1)
    if se is not None:
        w = 1.0 / se**2
    else:
        w = np.ones_like(x)
    XtWX = X.T @ (w[:, None] * X)
    cov = np.linalg.inv(XtWX)
    beta = cov @ (X.T @ (w * y))
    resid = y - X @ beta
    dof = len(x) - 2
    chi2 = float((w * resid**2).sum())
    if se is None:
        s2 = chi2 / dof if dof > 0 else float("nan")
        cov = cov * s2
        chi2 = float("nan")
    return beta, cov, chi2, dof


@dataclass
class SweepResult:
    """Observables with error bars at each setting of one precision knob.

    Attributes
    ----------
    knob : str
        ``"nbeta"``, ``"localization"`` or ``"tolerance:<constraint name>"``.
    values : list of float
        The knob's values, in the order sampled.
    observables : dict
        ``name → list of (value, stderr)`` per setting.
    results : dict
        ``name → list`` of the raw objects the observables returned (e.g. ``InfoResult``).
    settings : list of dict
        Per setting: ``nbeta``, ``localization``, constraint tolerances/ρ, sampler settings.
    refs : list of ReferenceClass or None
        The reference classes (kept with ``keep=True``).
    units : dict
        ``name → unit`` labels that override ``unit()``'s inference (plots put each unit
        on its own axis).
    """

    knob: str
    values: list[float]
    observables: dict[str, list[tuple[float, float]]]
    results: dict[str, list[Any]]
    settings: list[dict]
    refs: list[Any] | None = None
    notes: list[str] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)

    def value(self, name: str | None = None) -> np.ndarray:
        """Values of an observable per setting."""
        return np.array([v for v, _ in self._get(name)])

    def stderr(self, name: str | None = None) -> np.ndarray:
        """Standard errors of an observable per setting (NaN where none)."""
        return np.array([s for _, s in self._get(name)])

    def _get(self, name):
        if name is None:
            if len(self.observables) != 1:
                raise ValueError(f"several observables; name one of {list(self.observables)}")
            name = next(iter(self.observables))
        if name not in self.observables:
            from ._errors import nearest

            raise KeyError(
                f"no observable {name!r}; have {list(self.observables)} "
                f"(nearest: {nearest(name, list(self.observables))})"
            )
        return self.observables[name]

    def _x_label(self) -> str:
        return {"nbeta": "log nβ", "localization": "log γ"}.get(
            self.knob, f"log σ[{self.knob.split(':', 1)[-1]}]"
        )

    def slope(self, name: str | None = None) -> Slope:
        """``d(observable)/d log(knob)`` by weighted least squares over all settings.

        For an ``nbeta`` sweep this is ``dI/d log nβ`` (docs/theory.md §3.4.6); expect about
        ``k_eff/2`` in regular directions at large nβ.
        """
        obs = self._get(name)
        name = name or next(iter(self.observables))
        x = np.log(np.asarray(self.values, dtype=float))
        y = np.array([v for v, _ in obs], dtype=float)
        se = np.array([s for _, s in obs], dtype=float)
        ok = np.isfinite(y)
        x, y, se = x[ok], y[ok], se[ok]
        if len(x) < 2 or np.ptp(x) == 0:
            raise ValueError(f"a slope needs ≥ 2 settings with distinct values; have {len(x)}")
        use_se = bool(np.all(np.isfinite(se)) and np.all(se >= 0))
        if use_se:
            # a saturated estimate can have a zero bootstrap spread; floor the errors so
            # that one point does not get an infinite weight
            se = np.maximum(se, 1e-8 * np.maximum(1.0, np.abs(y)))
        if not use_se and len(x) < 3:
            raise ValueError(
                f"{name!r} has no standard errors, so the slope's error comes from the residuals "
                f"and needs ≥ 3 settings; have {len(x)}"
            )
        beta, cov, chi2, dof = _wls(x, y, se if use_se else None)
        err = float(math.sqrt(cov[1, 1]))
        scale = math.sqrt(max(1.0, chi2 / dof)) if (use_se and dof > 0) else 1.0
        return Slope(
            value=float(beta[1]),
            stderr=err,
            intercept=float(beta[0]),
            chi2=chi2,
            dof=dof,
            stderr_scaled=err * scale,
            x=self._x_label(),
            observable=name,
            range=(float(np.exp(x.min())), float(np.exp(x.max()))),
        )

    def table(self) -> str:
        """A plain-text table: one row per setting, ``value ± stderr`` per observable."""
        from .reference import _table

        rows = []
        for i, v in enumerate(self.values):
            row: dict[str, Any] = {self.knob: float(v)}
            st = self.settings[i]
            if self.knob != "nbeta":
                row["nbeta"] = st.get("nbeta")
            if self.knob != "localization":
                row["γ"] = st.get("localization")
            for nm, obs in self.observables.items():
                val, se = obs[i]
                row[nm] = f"{val:.4g} ± {se:.2g}" if np.isfinite(se) else f"{val:.4g}"
            rows.append(row)
        cols = list(rows[0]) if rows else [self.knob]
        return _table(rows, cols)

    def __str__(self) -> str:
        return self.table()

    def unit(self, name: str) -> str:
        """The unit of an observable, for axis labels: from ``self.units`` if given there,
        else from the kind of object it returned (``InfoResult`` → nats, ``LLC`` → λ̂), else
        from its name (``mi``/``info``/``entropy`` → nats, ``acc*`` → fraction,
        ``binding`` → binding ratio, ``virial`` → virial ratio, ``loss`` → nats per sample,
        ``llc``/``lambda`` → λ̂), else the name itself (its own axis)."""
        if name in self.units:
            return str(self.units[name])
        objs = self.results.get(name) or []
        kinds = {type(o).__name__ for o in objs}
        if kinds == {"InfoResult"}:
            return "nats"
        if kinds == {"LLC"}:
            return "λ̂ (learning coefficient)"
        low = name.lower()
        for keys, unit in _UNIT_RULES:
            if any(k(low) for k in keys):
                return unit
        return name

    def plot(self, ax=None, names: Sequence[str] | None = None, units=None, **errorbar_kw):
        """Error-bar plots of the observables against the knob (log axis), one panel per unit.

        Observables that share a unit (``unit()``; ``units={name: unit}`` overrides) share a
        panel, labelled with that unit; different units never share an axis. Returns the
        ``Axes`` when there is one panel, else a list of ``Axes`` (one per unit, in the
        order the observables appear).

        ``ax`` is an ``Axes`` (one unit) or a sequence of them (one per unit); by default
        a figure with one row per unit is made. ``names`` selects observables (default
        all); ``label=`` names this curve (e.g. ``"conditioned"``) so that several sweeps
        can share the axes; other keywords go to ``matplotlib.axes.Axes.errorbar``.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("SweepResult.plot needs matplotlib: `pip install matplotlib`") from e
        names = list(self.observables) if names is None else list(names)
        for nm in names:
            self._get(nm)
        if units is not None:
            if not isinstance(units, Mapping):
                raise TypeError("units must be a dict observable name → unit label")
            self.units.update({str(k): str(v) for k, v in units.items()})
        groups: dict[str, list[str]] = {}
        for nm in names:
            groups.setdefault(self.unit(nm), []).append(nm)
        if ax is None:
            k = len(groups)
            _, axes = plt.subplots(k, 1, figsize=(5, 2.6 * k + 0.9), sharex=True, squeeze=False)
            axes = list(axes[:, 0])
        else:
            axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
            axes = list(np.ravel(np.asarray(axes, dtype=object)))
            if len(axes) != len(groups):
                raise ValueError(
                    f"ax: {len(axes)} Axes given for {len(groups)} unit(s) {list(groups)}; "
                    f"pass one Axes per unit (or names=[...] of one unit)"
                )
        x = np.asarray(self.values, dtype=float)
        label = errorbar_kw.pop("label", None)
        errorbar_kw.setdefault("marker", "o")
        errorbar_kw.setdefault("capsize", 3)
        knob = {"nbeta": "nβ", "localization": "γ"}.get(self.knob, self.knob)
        for a, (unit, nms) in zip(axes, groups.items(), strict=True):
            for nm in nms:
                y, se = self.value(nm), self.stderr(nm)
                if label is None:
                    lbl = nm
                else:
                    lbl = label if len(nms) == 1 else f"{label}: {nm}"
                a.errorbar(x, y, yerr=np.where(np.isfinite(se), se, 0.0), label=lbl, **errorbar_kw)
            a.set_xscale("log")
            a.set_ylabel(unit)
            if len(nms) > 1 or label is not None or unit != nms[0]:
                a.legend()
        for a in axes if ax is not None else axes[-1:]:
            a.set_xlabel(knob)
        return axes[0] if len(axes) == 1 else axes

    def to_dict(self) -> dict:
        return {
            "knob": self.knob,
            "values": list(map(float, self.values)),
            "observables": {k: [list(p) for p in v] for k, v in self.observables.items()},
            "settings": self.settings,
            "notes": list(self.notes),
        }


_UNIT_RULES = (
    (
        (
            lambda s: s == "mi" or s.startswith("mi_") or s.endswith("_mi") or "info" in s,
            lambda s: "entropy" in s,
        ),
        "nats",
    ),
    ((lambda s: s.startswith("acc") or "accuracy" in s,), "fraction (accuracy)"),
    ((lambda s: "binding" in s,), "binding ratio"),
    ((lambda s: "virial" in s,), "virial ratio"),
    (
        (lambda s: s in ("llc", "lambda", "lambda_hat") or s.startswith("llc"),),
        "λ̂ (learning coefficient)",
    ),
    ((lambda s: "loss" in s,), "loss (nats per sample)"),
)


def _value_se(obj) -> tuple[float, float]:
    """(value, stderr) of an observable's return value."""
    if isinstance(obj, (int, float, np.floating, np.integer)):
        return float(obj), float("nan")
    if isinstance(obj, tuple) and len(obj) == 2:
        return float(obj[0]), float(obj[1])
    for v_attr in ("value", "mean"):
        if hasattr(obj, v_attr):
            se = getattr(obj, "stderr", float("nan"))
            return float(getattr(obj, v_attr)), float(se)
    raise TypeError(
        f"an observable returned a {type(obj).__name__}; return a float, a (value, stderr) "
        f"pair, or an object with .value (or .mean) and .stderr (e.g. InfoResult, LLC)"
    )


def _declarations(post: LocalPosterior, knob: str, values, cname: str | None):
    """One LocalPosterior per setting, reusing the network, data, lifting and specs."""
    out = []
    for v in values:
        if knob == "nbeta":
            out.append(post._replace(nbeta=float(v)))
        elif knob == "localization":
            out.append(post._replace(localization=float(v)))
        else:
            specs = []
            for spec, b in zip(post._specs, post._bound, strict=True):
                if b.name == cname:
                    spec = copy.copy(spec)
                    spec.tolerance, spec.strength = float(v), None
                    spec.name = cname
                specs.append(spec)
            out.append(post._replace(constraints=specs))
    return out


def _check_values(name, values) -> list[float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence | np.ndarray):
        raise TypeError(f"{name} must be a list of positive numbers; got {type(values).__name__}")
    vals = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must hold numbers; got {v!r}") from None
        if not (f > 0 and math.isfinite(f)):
            raise ValueError(f"{name} values must be positive and finite; got {v!r}")
        vals.append(f)
    if len(vals) < 1:
        raise ValueError(f"{name} is empty; give at least one value (two for a slope)")
    if len(set(vals)) != len(vals):
        raise ValueError(f"{name} has repeated values: {vals}")
    return vals


def sweep(
    post: LocalPosterior,
    *,
    nbeta: Sequence[float] | None = None,
    tolerance: Mapping[str, Sequence[float]] | None = None,
    localization: Sequence[float] | None = None,
    method: str | Callable = "nuts",
    observables: Mapping[str, Callable[[ReferenceClass], Any]] | None = None,
    mi: Mapping[str, Any] | None = None,
    chains: int = 4,
    warmup: int = 500,
    draws: int = 1000,
    seed: int = 0,
    warm_start: bool = True,
    keep: bool = True,
    progress: bool = True,
    **sample_kwargs,
) -> SweepResult:
    """Sample a family of reference classes over one precision knob and measure on each.

    Parameters
    ----------
    post : LocalPosterior
        The declaration (network, data, likelihood, constraints) to vary.
    nbeta, localization : list of float
        Values of nβ or of γ (give exactly one knob).
    tolerance : dict
        ``{constraint_name: [σ, ...]}`` for one constraint (absolute tolerances; a
        constraint declared with ``strength=`` is switched to ``tolerance=``).
    method : str or callable
        Sampler name for ``post.sample`` (``"nuts"``, ``"hmc"``, ``"sgld"``, ...), or a
        callable ``(post, chains=, warmup=, draws=, seed=, progress=, **kw) ->
        ReferenceClass`` (e.g. an exact sampler for a Gaussian posterior).
    observables : dict
        ``name → callable(ref)`` returning a float, ``(value, stderr)`` or an object
        with ``.value``/``.mean`` and ``.stderr`` (``InfoResult``, ``LLC``).
    mi : dict
        Shorthand for the observable ``"mi"``:
        ``condpost.info.mutual_information(ref, **mi)`` (keys ``probes``, ``a``, ``b``,
        ``target``, ``estimator``, ``bootstrap``, ...). Its progress bar is off unless
        given.
    chains, warmup, draws, seed
        Passed to the sampler; setting ``k`` uses seed ``seed + k``.
    warm_start : bool
        NUTS/HMC: start each setting's step-size adaptation from the previous setting's
        adapted step size, scaled by ``sqrt(nβ_prev/nβ_new)`` for an nβ sweep (the
        posterior's width scales like ``nβ^{-1/2}`` in loss-dominated directions).
        Chains still start at ``w*``, where the local posterior concentrates.
    keep : bool
        Keep each ``ReferenceClass`` in ``result.refs`` (default True).
    progress : bool
        A progress bar over settings (the sampler's own bars follow ``progress`` too).
    **sample_kwargs
        Further sampler options (``target_accept``, ``backend``, ...).

    Returns
    -------
    SweepResult
        Per setting: every observable's value ± stderr, the settings and the refs.

    Notes
    -----
    Reused across settings: the network and its lifted layout, the data, the likelihood
    and the constraint declarations (re-bound at each setting, since ``ρ_c`` depends on
    ``nβ`` in relative mode), and, with ``warm_start``, the adapted NUTS step size.
    Not reused: the adapted mass matrix and the chain positions (the Pyro kernel does
    not take them), and compiled JAX work beyond what the backend caches itself.
    """
    from tqdm.auto import tqdm

    from .posterior import LocalPosterior

    if not isinstance(post, LocalPosterior):
        raise TypeError(f"post must be a LocalPosterior; got {type(post).__name__}")
    given = [
        k
        for k, v in (("nbeta", nbeta), ("localization", localization), ("tolerance", tolerance))
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(
            f"give exactly one knob to sweep: nbeta=[...], localization=[...] or "
            f"tolerance={{'constraint': [...]}}; got {given or 'none'}"
        )
    knob_arg = given[0]
    cname = None
    if knob_arg == "tolerance":
        if not isinstance(tolerance, Mapping) or len(tolerance) != 1:
            raise ValueError(
                "tolerance must be a dict with one constraint name → list of tolerances, e.g. "
                "tolerance={'circuit:0->2': [0.3, 0.1, 0.03]}"
            )
        cname, values = next(iter(tolerance.items()))
        names = [b.name for b in post.constraints]
        if cname not in names:
            from ._errors import nearest

            raise ValueError(
                f"tolerance: no constraint named {cname!r} in this posterior; declared: {names}"
                + (f" (nearest: {nearest(cname, names)})" if names else "")
            )
        values = _check_values(f"tolerance[{cname!r}]", values)
        knob = f"tolerance:{cname}"
    else:
        values = _check_values(knob_arg, nbeta if knob_arg == "nbeta" else localization)
        knob = knob_arg
    obs: dict[str, Callable] = {}
    if observables is not None:
        if not isinstance(observables, Mapping):
            raise TypeError("observables must be a dict name → callable(ref)")
        for nm, fn in observables.items():
            if not callable(fn):
                raise TypeError(f"observables[{nm!r}] is not callable")
            obs[str(nm)] = fn
    if mi is not None:
        if not isinstance(mi, Mapping):
            raise TypeError("mi must be a dict of keyword arguments of info.mutual_information")
        if "mi" in obs:
            raise ValueError("an observable is already named 'mi'; rename it or drop mi=")
        mi_kw = dict(mi)
        mi_kw.setdefault("progress", False)

        def _mi(ref, _kw=mi_kw):
            from .info.ensemble import mutual_information

            return mutual_information(ref, **_kw)

        obs["mi"] = _mi
    if not obs:
        raise ValueError("nothing to measure: pass observables={...} and/or mi=dict(...)")
    if not (callable(method) or isinstance(method, str)):
        raise TypeError("method must be a sampler name or a callable(post, **kw) -> ReferenceClass")

    decls = _declarations(post, "tolerance" if cname else knob, values, cname)
    out_obs: dict[str, list] = {k: [] for k in obs}
    raw: dict[str, list] = {k: [] for k in obs}
    settings, refs, notes = [], [], []
    prev_step, prev_nb = None, None
    user_step = "step_size" in sample_kwargs
    for i, (_v, p) in enumerate(
        zip(tqdm(values, desc=f"sweep {knob}", disable=not progress), decls, strict=True)
    ):
        kw = dict(sample_kwargs)
        mname = method if isinstance(method, str) else getattr(method, "__name__", "custom")
        if (
            warm_start
            and not user_step
            and prev_step is not None
            and isinstance(method, str)
            and method.lower() in ("nuts", "hmc")
        ):
            kw["step_size"] = float(prev_step * math.sqrt(prev_nb / p.nbeta))
        common = dict(chains=chains, warmup=warmup, draws=draws, seed=seed + i, progress=progress)
        if callable(method):
            ref = method(p, **common, **kw)
        else:
            ref = p.sample(method, **common, **kw)
        st = ref.stat("sampler/step_size") if _has_stat(ref, "sampler/step_size") else None
        if st is not None and np.all(np.isfinite(st)) and np.size(st):
            prev_step, prev_nb = float(np.median(st)), p.nbeta
        s = {
            "nbeta": p.nbeta,
            "localization": p.localization,
            "constraints": {
                b.name: {"tolerance": b.tolerance, "strength": b.strength, "rho": b.rho}
                for b in p.constraints
            },
            "method": mname,
            "chains": chains,
            "warmup": warmup,
            "draws": draws,
            "seed": seed + i,
            "initial_step_size": kw.get("step_size"),
        }
        settings.append(s)
        for nm, fn in obs.items():
            r = fn(ref)
            out_obs[nm].append(_value_se(r))
            raw[nm].append(r)
        if keep:
            refs.append(ref)
    return SweepResult(
        knob=knob,
        values=values,
        observables=out_obs,
        results=raw,
        settings=settings,
        refs=refs if keep else None,
        notes=notes,
    )


def _has_stat(ref, key: str) -> bool:
    try:
        ref.stat(key)
    except (KeyError, AttributeError):
        return False
    return True
