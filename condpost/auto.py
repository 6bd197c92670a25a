"""``draws="auto"``: sample in rounds until λ̂ is reliable (docs/llc.md).

An SG-MCMC run is extended in rounds, each continuing the previous one exactly (the
executor's run store with ``resume=True`` and a larger ``draws``: the chains, their
random streams and the sampler state carry on, so the result equals one uninterrupted
run of the final length). After every round the draws so far are checked against four
criteria:

* **plateau**: neither ``nβ(L_n(w) − L_n(w*))`` nor ``‖w − w*‖²`` is still trending. A
  line through batch means of the chain-averaged trace (``condpost.diagnostics.trend``)
  must change by no more than two standard errors, or by less than ``rtol·λ̂`` (loss)
  and ``plateau_tol`` relative (``‖w − w*‖²``). The start of the kept draws is dropped
  (a quarter, then a half) when that makes the rest flat;
* **rhat**: split R-hat of the loss at most ``rhat`` (default 1.01);
* **virial**: ``|E[(w − w*)·∇U]/d − 1|`` within ``virial_tol`` plus two standard errors;
* **mcse**: the standard error of λ̂ (``LLC.stderr``: the largest of the ESS-based,
  batch-means and chain-means errors, docs/llc.md) at most ``rtol·|λ̂|`` (or ``atol``).

The run ends when all hold (``stop_reason="converged"``, with ``limiting`` naming the
criterion met last), at ``max_draws`` (``"max_draws"``, with the criteria still unmet),
or when the virial ratio is off by more than the tolerance with a small error, which
more draws cannot fix (``"virial_bias"``: the step size is too large). The next round's
length comes from the criterion that failed: the MC error scales like ``1/√draws``, so
a round that only misses ``rtol`` is sized to reach it (between 1.5× and 4× the
current length); a trending or disagreeing run doubles.

``sample_auto`` returns the ``ReferenceClass`` (``ref.settings["auto"]`` holds the
report) and ``estimate_llc`` the ``LLC`` (``lam.run``). ``sample_auto_result`` is the
same as a driver hook: it returns the executor's ``SampleResult``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import SamplerWarning, warn

if TYPE_CHECKING:  # pragma: no cover
    from .infer.base import SampleResult
    from .llc import LLC
    from .posterior import LocalPosterior
    from .reference import ReferenceClass

__all__ = ["sample_auto", "sample_auto_result", "estimate_llc", "AUTO_OPTIONS"]

SGMCMC = ("sgld", "rmsprop_sgld", "sghmc", "sgnht")

#: the options ``draws="auto"`` adds to ``post.sample`` (a driver pops these before the
#: runner sees the rest)
AUTO_OPTIONS = (
    "calibrate",
    "rtol",
    "atol",
    "max_draws",
    "min_draws",
    "rhat",
    "virial_tol",
    "plateau_tol",
    "estimator",
)


def _pos_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer, float)) or int(v) != v or v < lo:
        raise ValueError(f"{name} must be an integer ≥ {lo}; got {v!r}")
    return int(v)


def _pos_float(name: str, v, *, allow_zero: bool = False) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {v!r}") from None
    if isinstance(v, bool) or not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ValueError(
            f"{name} must be a {'non-negative' if allow_zero else 'positive'} finite number; got {v!r}"
        )
    return x


def _flat_window(nbL: np.ndarray, D2: np.ndarray | None, lam_tol: float, plateau_tol: float):
    """(discard, plateau_ok, details): the smallest start cut (0, ¼, ½ of the draws) after
    which the loss and ‖w − w*‖² traces are flat."""
    from .diagnostics import trend

    S = nbL.shape[1]
    out = None
    for frac in (0, 4, 2):
        cut = 0 if frac == 0 else S // frac
        if S - cut < 16:
            continue
        tl = trend(nbL[:, cut:])
        ok_l = tl.flat(abs_tol=lam_tol)
        det = {
            "loss_change": tl.change,
            "loss_change_se": tl.stderr,
        }
        ok_d = True
        if D2 is not None and D2.shape[1] == S:
            td = trend(D2[:, cut:])
            ok_d = td.flat(rel=plateau_tol)
            det.update(dist2_change=td.change, dist2_change_se=td.stderr, dist2_mean=td.mean)
        out = (cut, ok_l and ok_d, det)
        if ok_l and ok_d:
            return out
    if out is None:  # too short to judge
        return 0, False, {"loss_change": float("nan"), "loss_change_se": float("nan")}
    return out


def _assess(ref: ReferenceClass, *, rtol, atol, rhat, virial_tol, plateau_tol, estimator):
    """λ̂ and the four criteria on the draws so far."""
    from .diagnostics import split_rhat, virial_ratio
    from .llc import llc_sgmcmc

    L = np.asarray(ref.loss(), dtype=np.float64)
    every = int(ref.settings.get("loss_every") or 1)
    nbL = ref.nbeta * (L - ref.config["loss_center"])
    D2 = np.asarray(ref._stats["dist2"]) if "dist2" in ref._stats else None
    if D2 is not None and every > 1:
        D2 = D2[:, ::every][:, : L.shape[1]]
    lam0 = abs(float(nbL.mean()))
    cut_l, plateau, pdet = _flat_window(nbL, D2, max(rtol * lam0, atol), plateau_tol)
    discard = cut_l * every
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        lam = llc_sgmcmc(ref, estimator=estimator, warn_user=False, discard=discard)
    Lw = L[:, cut_l:]
    if Lw.shape[0] > 1:
        try:
            rh = float(split_rhat(Lw))
        except ValueError:
            rh = float("nan")
        ok_rhat = bool(np.isfinite(rh) and rh <= rhat) or (
            # a loss that is constant up to rounding has no R-hat; nothing disagrees
            bool(np.isnan(rh)) and float(np.ptp(Lw)) == 0.0
        )
    else:
        rh, ok_rhat = float("nan"), True
    vir = ref._stats.get("virial")
    vr = vse = float("nan")
    ok_vir, vir_bias = True, False
    if vir is not None:
        V = np.asarray(vir, dtype=np.float64)[:, discard:]
        if V.shape[1] >= 4:
            vc = virial_ratio(V, ref.d)
            vr, vse = vc.ratio, vc.stderr
            dev = abs(vr - 1.0)
            se = vse if np.isfinite(vse) else 0.0
            ok_vir = bool(dev <= virial_tol + 2 * se)
            vir_bias = bool(dev > virial_tol + 4 * se and se < 0.25 * virial_tol)
    target = max(rtol * abs(lam.mean), atol)
    ok_mcse = bool(np.isfinite(lam.stderr) and lam.stderr <= target)
    crit = {
        "plateau": {"ok": plateau, **pdet},
        "rhat": {"ok": ok_rhat, "value": rh, "max": rhat},
        "virial": {"ok": ok_vir, "ratio": vr, "stderr": vse, "tol": virial_tol},
        "mcse": {"ok": ok_mcse, "stderr": lam.stderr, "target": target, "rtol": rtol},
    }
    return lam, crit, discard, vir_bias


def _next_draws(S: int, discard: int, crit: dict, lam: LLC, max_draws: int) -> int:
    if crit["plateau"]["ok"] and crit["rhat"]["ok"] and crit["virial"]["ok"]:
        se, target = crit["mcse"]["stderr"], crit["mcse"]["target"]
        kept = max(S - discard, 1)
        if np.isfinite(se) and target > 0 and se > 0:
            need = discard + int(math.ceil(1.15 * kept * (se / target) ** 2))
        else:
            need = 2 * S
        new = min(max(need, int(1.5 * S)), 4 * S)
    else:
        new = 2 * S
    return int(min(max(new, S + 1), max_draws))


def _resolve_step(post, method, options, seed, progress, calibrate=None):
    st = options.get("step_size")
    if isinstance(st, str) and st.lower() == "auto":
        try:
            from .stepsize import resolve_step_size
        except ImportError:  # pragma: no cover - the calibration ships with condpost
            raise ValueError(
                "step_size='auto' needs condpost.stepsize.resolve_step_size; pass a number"
            ) from None
        out = resolve_step_size(
            post, method, options, seed=seed, progress=progress, **dict(calibrate or {})
        )
        return out, {"step_size": float(out["step_size"]), "step_size_from": "calibrate_step_size"}
    return dict(options), {}


def sample_auto_result(
    post: LocalPosterior,
    method: str = "sgld",
    *,
    chains: int = 8,
    warmup: int = 1000,
    seed: int = 0,
    backend: str | None = None,
    progress: bool = False,
    rtol: float = 0.02,
    atol: float = 0.0,
    max_draws: int = 20_000,
    min_draws: int | None = None,
    rhat: float = 1.01,
    virial_tol: float = 0.05,
    plateau_tol: float = 0.05,
    estimator: str | None = None,
    store: str | Path | None = None,
    warn_user: bool = True,
    calibrate: dict | None = None,
    **options,
) -> SampleResult:
    """``draws="auto"`` as the driver sees it: the rounds, returning a ``SampleResult``.

    See ``sample_auto`` for the arguments. ``settings["auto"]`` holds the report and
    ``settings["draws"]`` the final length.
    """
    from .infer.base import SampleResult
    from .reference import ReferenceClass
    from .run import sample as run_sample

    method = str(method).lower()
    if method not in SGMCMC:
        raise ValueError(
            f"draws='auto' extends a run in rounds and needs an SG-MCMC method {list(SGMCMC)}; "
            f"got method={method!r}. For NUTS/HMC pass an integer draws and check "
            f"ref.summary() (R-hat, ESS)."
        )
    chains = _pos_int("chains", chains, 1)
    warmup = _pos_int("warmup", warmup, 0)
    max_draws = _pos_int("max_draws", max_draws, 16)
    if min_draws is None:
        min_draws = min(max_draws, max(200, -(-4000 // chains)))
    min_draws = _pos_int("min_draws", min_draws, 16)
    if min_draws > max_draws:
        raise ValueError(f"min_draws={min_draws} exceeds max_draws={max_draws}")
    rtol = _pos_float("rtol", rtol, allow_zero=True)
    atol = _pos_float("atol", atol, allow_zero=True)
    if rtol == 0 and atol == 0:
        raise ValueError("give rtol > 0 (relative MC error of λ̂, e.g. 0.02) or atol > 0")
    rhat = _pos_float("rhat", rhat)
    virial_tol = _pos_float("virial_tol", virial_tol)
    plateau_tol = _pos_float("plateau_tol", plateau_tol)
    if "resume" in options:
        raise ValueError(
            "draws='auto' manages resume itself; to extend a stored run pass store=<path> "
            "of a new run, or call post.sample(..., store=<path>, resume=True, draws=N)"
        )
    options, step_info = _resolve_step(post, method, options, seed, progress, calibrate)
    if options.get("step_size") is None:
        raise TypeError(
            f"{method} needs step_size=... with draws='auto': a number, or 'auto' "
            f"(condpost.calibrate_step_size picks it)"
        )
    tmp = None
    if store is None:
        tmp = tempfile.mkdtemp(prefix="condpost-auto-")
        path = str(Path(tmp) / "run.cpst")
    else:
        path = str(store)
    t0 = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    S = min_draws
    stop = None
    try:
        while True:
            result = run_sample(
                post,
                method,
                chains=chains,
                warmup=warmup,
                draws=S,
                seed=seed,
                backend=backend,
                progress=progress,
                store=path,
                resume=bool(rounds),
                **options,
            )
            if result.fault:
                stop = "fault"
                rounds.append({"draws": S, "fault": result.fault})
                break
            ref = ReferenceClass.from_result(post, result)
            lam, crit, discard, vir_bias = _assess(
                ref,
                rtol=rtol,
                atol=atol,
                rhat=rhat,
                virial_tol=virial_tol,
                plateau_tol=plateau_tol,
                estimator=estimator,
            )
            rounds.append(
                {
                    "draws": S,
                    "discard": discard,
                    "llc": lam.mean,
                    "stderr": lam.stderr,
                    "stderr_source": lam.stderr_detail.get("source"),
                    **{f"{k}_ok": v["ok"] for k, v in crit.items()},
                    "wall_s": time.perf_counter() - t0,
                }
            )
            if all(v["ok"] for v in crit.values()):
                stop = "converged"
                break
            if vir_bias:
                stop = "virial_bias"
                break
            if S >= max_draws:
                stop = "max_draws"
                break
            S = _next_draws(S, discard, crit, lam, max_draws)
        # the criterion met last: the first round from which it held
        limiting = None
        if stop == "converged":
            last_fail = {}
            for k in ("plateau", "rhat", "virial", "mcse"):
                fails = [i for i, r in enumerate(rounds) if not r.get(f"{k}_ok", True)]
                last_fail[k] = fails[-1] if fails else -1
            limiting = max(last_fail, key=lambda k: last_fail[k])
            if last_fail[limiting] < 0:
                limiting = "all held at the first round"
        unmet = [k for k, v in crit.items() if not v["ok"]] if stop != "fault" else []
        report = {
            "stop_reason": stop,
            "limiting": limiting,
            "unmet": unmet,
            "criteria": crit if stop != "fault" else {},
            "rounds": rounds,
            "draws": S,
            "discard": rounds[-1].get("discard", 0),
            "rtol": rtol,
            "atol": atol,
            "max_draws": max_draws,
            "min_draws": min_draws,
            "store": None if tmp else path,
            "wall_time_s": time.perf_counter() - t0,
            **step_info,
        }
        if tmp is not None:
            # bring the run into memory and drop the temporary store
            draws = None if result.draws is None else np.array(result.draws)
            stats = {k: np.array(v) for k, v in result.stats.items()}
            result = SampleResult(
                draws=draws,
                stats=stats,
                settings=dict(result.settings),
                fault=result.fault,
                store=None,
            )
            result.settings.pop("store", None)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result.settings["draws"] = S
    result.settings["draws_requested"] = "auto"
    result.settings["auto"] = report
    if step_info:
        result.settings["step_size"] = step_info["step_size"]
    if warn_user and stop == "max_draws":
        warn(
            f"draws='auto' stopped at max_draws={max_draws} with {', '.join(unmet)} unmet "
            f"({_explain(crit, unmet)}). Raise max_draws, or see ref.settings['auto'].",
            SamplerWarning,
        )
    elif warn_user and stop == "virial_bias":
        v = crit["virial"]
        warn(
            f"draws='auto' stopped: the virial ratio is {v['ratio']:.3f} ± {v['stderr']:.2g}, "
            f"off 1 by more than virial_tol={virial_tol:g}. The draws do not follow the "
            f"target (step size too large, or minibatch noise); more draws will not fix "
            f"it. Lower step_size (or use step_size='auto'), or raise batch_size.",
            SamplerWarning,
        )
    return result


def _explain(crit: dict, unmet: list[str]) -> str:
    out = []
    for k in unmet:
        c = crit[k]
        if k == "mcse":
            out.append(f"s.e. {c['stderr']:.3g} > target {c['target']:.3g}")
        elif k == "rhat":
            out.append(f"R-hat {c['value']:.3f} > {c['max']}")
        elif k == "virial":
            out.append(f"virial {c['ratio']:.3f} ± {c['stderr']:.2g}")
        elif k == "plateau":
            s = f"loss trend {c['loss_change']:.3g} ± {c['loss_change_se']:.2g}"
            if "dist2_change" in c:
                s += f", ‖w − w*‖² trend {c['dist2_change']:.3g} on {c['dist2_mean']:.3g}"
            out.append(s)
    return "; ".join(out)


def sample_auto(post: LocalPosterior, method: str = "sgld", **kwargs) -> ReferenceClass:
    """Sample until λ̂ is reliable: ``post.sample(method, draws="auto", ...)``.

    Parameters
    ----------
    post : LocalPosterior
    method : {"sgld", "rmsprop_sgld", "sghmc", "sgnht"}
    chains, warmup, seed, backend, progress :
        As for ``post.sample`` (default 8 chains: the chain-means error needs several).
    rtol : float
        Requested relative MC error of λ̂ (default 0.02: ``stderr ≤ 0.02·|λ̂|``).
    atol : float
        Absolute alternative for λ̂ near 0 (default 0).
    max_draws : int
        Cap on the kept draws per chain (default 20,000).
    min_draws : int, optional
        Length of the first round (default ``max(200, ⌈4000/chains⌉)``).
    rhat, virial_tol, plateau_tol : float
        Thresholds of the criteria (module docs): 1.01, 0.05, 0.05.
    estimator : str, optional
        Passed to ``llc`` (None: the run's loss estimator).
    store : path, optional
        Keep the run in this store (a new one); default: a temporary store, removed at
        the end, with the result in memory.
    warn_user : bool
        Warn when the run ended without meeting the criteria.
    calibrate : dict, optional
        With ``step_size="auto"``: keywords for ``calibrate_step_size`` (``steps``,
        ``chains``, ``tolerance``, ...).
    **options
        The sampler's options (``step_size`` (a number or ``"auto"``), ``batch_size``,
        ``thin``, ``keep_draws``, ``loss``, ...).

    Returns
    -------
    ReferenceClass
        With ``ref.settings["auto"]``: ``stop_reason`` (``"converged"``, ``"max_draws"``,
        ``"virial_bias"`` or ``"fault"``), ``limiting`` (the criterion met last), ``unmet``,
        ``criteria`` (values and thresholds), ``rounds`` and ``discard`` (kept draws per
        chain that ``ref.llc()`` in ``estimate_llc`` leaves out at the start).
    """
    from .reference import ReferenceClass

    return ReferenceClass.from_result(post, sample_auto_result(post, method, **kwargs))


def estimate_llc(
    post: LocalPosterior,
    method: str = "sgld",
    *,
    draws: int | str = "auto",
    step_size: float | str = "auto",
    keep_draws: bool = False,
    warn_user: bool = True,
    **kwargs,
) -> LLC:
    """λ̂ with SG-MCMC, sampled until reliable (``draws="auto"``) or for a fixed length.

    ``estimate_llc(post)`` calibrates the step size (``step_size="auto"``,
    ``condpost.calibrate_step_size``), samples in rounds until the plateau, R-hat, virial
    and MC-error criteria hold (``sample_auto``; ``rtol=0.02`` by default) and returns the
    ``LLC`` of the draws after the dropped start, with the report in ``lam.run``
    (``lam.run["stop_reason"]``). With an integer ``draws`` it is
    ``post.sample(method, draws=draws, ...).llc()``. Only the per-draw statistics are kept
    unless ``keep_draws=True``.
    """
    from .llc import LLC, llc_sgmcmc

    estimator = kwargs.get("estimator")
    if isinstance(draws, str):
        if draws.lower() != "auto":
            raise ValueError(f"draws must be an integer or 'auto'; got {draws!r}")
        ref = sample_auto(
            post,
            method,
            step_size=step_size,
            keep_draws=keep_draws,
            warn_user=warn_user,
            **kwargs,
        )
        rep = ref.settings["auto"]
        lam = llc_sgmcmc(ref, estimator=estimator, warn_user=warn_user, discard=rep["discard"])
        fields = {f: getattr(lam, f) for f in LLC.__dataclass_fields__}
        fields["run"] = rep
        return LLC(**fields)
    calibrate = kwargs.pop("calibrate", None)
    for k in AUTO_OPTIONS:
        if k in kwargs and k != "estimator":
            raise ValueError(f"{k}= applies to draws='auto' only; got draws={draws!r}")
    kwargs.pop("estimator", None)
    opts, _ = _resolve_step(
        post,
        method,
        {"step_size": step_size, **kwargs},
        kwargs.get("seed", 0),
        kwargs.get("progress", False),
        calibrate,
    )
    kwargs.setdefault("progress", False)
    kwargs.pop("step_size", None)
    opts.update(kwargs)
    ref = post.sample(method, draws=draws, keep_draws=keep_draws, **opts)
    return ref.llc(warn_user=warn_user, estimator=estimator)
