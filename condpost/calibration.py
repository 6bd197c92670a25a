"""Auto-calibration of constraint strengths (docs/theory.md §2.2) and linear-response sensitivities (§3.3)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._errors import ConstraintWarning, warn

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior
    from .reference import ReferenceClass

__all__ = ["calibrate", "solve_tolerance", "sensitivity", "Sensitivity"]


def solve_tolerance(eigenvalues, target_binding: float) -> float:
    """σ² solving ``(1/k) Σ_i v_i/(v_i + σ²) = b*`` (docs/theory.md §2.2), by bisection in log σ².

    ``eigenvalues`` are those of the feature's unconstrained covariance ``V_c`` (length
    ``k``; zeros allowed). Raises if ``b*`` exceeds the attainable ``rank(V_c)/k``.

    Parameters
    ----------
    eigenvalues : array_like
        Eigenvalues ``v_i`` of ``V_c`` (negative values are clipped to zero).
    target_binding : float
        The binding ratio ``b*`` to reach, in ``(0, 1)``.

    Returns
    -------
    float
        The tolerance squared, σ².
    """
    v = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
    k = v.size
    if not 0 < target_binding < 1:
        raise ValueError(f"target_binding must lie in (0, 1); got {target_binding}")
    reach = np.count_nonzero(v > 0) / k
    if target_binding >= reach:
        raise ValueError(
            f"target_binding={target_binding} is unreachable: only {reach:.3f} of the feature's "
            f"directions vary in the pilot (the rest are already pinned); ask for less."
        )
    vmax = v.max()

    def b(s2):
        return float(np.mean(v / (v + s2)))

    lo, hi = math.log(vmax * 1e-12), math.log(vmax * 1e12)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if b(math.exp(mid)) > target_binding:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def _feature_draws(post: LocalPosterior, bound, W: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    from ._batching import batched

    def f(w):
        return bound.feature(post.view(w)).reshape(-1)

    bf = batched(f, f"constraint feature ({type(post.lifted.net).__name__})")
    with torch.no_grad():
        return torch.cat([bf(W[i : i + chunk]) for i in range(0, W.shape[0], chunk)])


def _local_rank(post: LocalPosterior, bound, max_entries: float = 2e7) -> int | None:
    """Numerical rank of the feature's Jacobian ``∂f_c/∂w`` at ``w*`` (None if too large)."""
    k, d = int(bound.k), int(post.d)
    if k * d > max_entries:
        return None
    from torch.func import jacrev

    def f(w):
        return bound.feature(post.view(w)).reshape(-1)

    w0 = post.center.detach().clone()
    try:
        J = jacrev(f)(w0)
    except Exception:  # noqa: BLE001 - features torch.func cannot trace: use autograd
        J = torch.autograd.functional.jacobian(f, w0)
    s = torch.linalg.svdvals(J.detach().to(torch.float64).reshape(k, d))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = s[0] * max(k, d) * torch.finfo(J.dtype).eps * 10
    return int((s > tol).sum())


def calibrate(
    post: LocalPosterior,
    target_binding: float = 0.5,
    *,
    constraints: list[str] | None = None,
    chains: int = 2,
    warmup: int | None = None,
    draws: int = 400,
    seed: int = 0,
    progress: bool = False,
    pilot: ReferenceClass | None = None,
    refine: int = 0,
    tol: float = 0.05,
    sample_kwargs: dict | None = None,
    method: str | None = None,
    max_steps: int = 20000,
) -> LocalPosterior:
    """Set constraint strengths so that each binds at ``target_binding`` (docs/theory.md §2.2).

    Runs a short NUTS pilot of ``post`` *without* its constraints (or uses ``pilot``),
    estimates each feature's unconstrained covariance ``V_c`` from the pilot draws,
    solves ``(1/k) Σ v_i/(v_i + σ²) = b*`` for σ, and returns a new posterior whose
    constraints carry the result in relative form, ``strength = α = k/(2σ² nβ)`` (so it
    transfers across nβ). ``V_c`` is the pilot's sample covariance (its spectrum from
    the draws' Gram matrix when there are fewer draws than feature dimensions, so at
    most ``S − 1`` directions count as free: a longer pilot is needed for high
    targets). Only the top ``rank(∂f_c/∂w at w*)`` eigenvalues are kept: the other
    directions of the feature cannot move to first order, so the constraint cannot pin
    them and the reachable binding is ``rank/k`` (a target above it is an error that says
    so). Only Gaussian-family constraints (two-sided defects, CKA)
    are calibrated; others are kept as declared, with a warning.

    The spectrum rule is exact for linear-Gaussian features; for a nonlinear network the
    achieved binding can differ (the feature's mean moves, its spread is not Gaussian).
    ``refine=r`` then runs up to ``r`` constrained runs, measures each constraint's binding
    ``b̂ = 2E[ρD]/k`` and corrects σ² by the one-parameter rescaling of the pilot spectrum
    (``v → c·v``) that reproduces ``b̂`` at the current σ², re-solving for ``b*``. It stops
    once every ``|b̂ − b*| ≤ tol``. The history is in ``calibration[name]["history"]``.

    **Any sampler.** ``method`` (or ``sample_kwargs["method"]``) picks the sampler of the
    pilot and the refinement runs: ``"nuts"`` (default) or an SG-MCMC method
    (``"sgld"``, ``"rmsprop_sgld"``, ``"sghmc"``, ``"sgnht"``). An SG-MCMC run is only
    useful once it has relaxed and while its step-size bias is small, and both depend on
    the posterior being sampled, so every SG-MCMC run is planned from the curvature
    (``_sg_plan``): with ``h_max`` the top Hessian eigenvalue of that run's potential (the
    constraints included, ``stepsize.top_curvature``), the step is at most ``0.2/h_max``
    (SGLD's variance inflation ``1/(1 − εh/4)`` stays within 5% in the stiffest
    direction; ``0.1/h_max`` for SGHMC/SGNHT's η, ``0.2/√h_max`` for RMSProp-SGLD), a
    given ``step_size`` larger than that is reduced, and ``step_size`` missing or
    ``"auto"`` uses the bound. The warmup is at least ``4/(εγ)`` steps (``4α/(ηγ)`` for
    SGHMC): the time for the directions held only by the localizer (curvature ``γ``) to
    relax within 2% of their stationary spread; the draws are thinned to span it. A short
    unrelaxed pilot under-reads the feature's spread, the spectrum rule then picks too
    small a σ, and the constraint binds several times harder than asked (issue 12: 5× at
    ε = 1e-5, 300 warmup steps, γ = 100). When a run needs more than ``max_steps`` steps
    per chain, the target is **refused** with the reason (typically: the σ it implies
    makes the potential so stiff that the largest accurate step cannot relax the
    localizer-held directions within the budget).

    Parameters
    ----------
    post : LocalPosterior
        A posterior with constraints declared (their strengths are replaced).
    target_binding : float
        The binding ratio ``b*`` in ``(0, 1)`` each constraint should reach (default 0.5).
    constraints : list of str, optional
        Names of the constraints to calibrate (default: all).
    chains : int
        Pilot chains (default 2).
    warmup : int, optional
        Warmup iterations per chain of the pilot and refinement runs (default 300 for
        NUTS; for SG-MCMC at least the relaxation time above).
    draws : int
        Pilot draws per chain (default 400).
    seed : int
        Pilot seed.
    progress : bool
        Show the pilot's progress bar.
    pilot : ReferenceClass, optional
        Draws of the unconstrained posterior to use instead of running a pilot.
    refine : int
        Maximum number of constrained refinement runs (default 0: spectrum rule only).
    tol : float
        Refinement stops when every calibrated binding is within ``tol`` of the target.
    sample_kwargs : dict, optional
        Extra keyword arguments for the pilot and refinement runs (``max_tree_depth``,
        ``target_accept``, ``num_threads``, ``step_size``, ``batch_size``, ...); may hold
        ``"method"``.
    method : str, optional
        Sampler of the pilot and refinement runs (default ``"nuts"``, or
        ``sample_kwargs["method"]``).
    max_steps : int
        SG-MCMC budget: steps per chain of one run (warmup + thinned draws); a target that
        needs more is refused (default 20,000).

    Returns
    -------
    LocalPosterior
        A copy of ``post`` with calibrated constraints and a ``calibration`` dict.
    """
    specs = list(post._specs)
    if not specs:
        raise ValueError("calibrate: the posterior declares no constraints")
    names = [b.name for b in post._bound]
    if constraints is not None:
        unknown = [c for c in constraints if c not in names]
        if unknown:
            raise ValueError(f"calibrate: unknown constraint(s) {unknown}; declared: {names}")
    kw = dict(sample_kwargs or {})
    kw_method = kw.pop("method", None)
    if method is not None and kw_method is not None and str(method) != str(kw_method):
        raise ValueError(
            f"calibrate: method={method!r} and sample_kwargs['method']={kw_method!r} differ; "
            f"give it once"
        )
    sampler = str(method or kw_method or "nuts").lower()
    if isinstance(max_steps, bool) or int(max_steps) != max_steps or max_steps < 100:
        raise ValueError(f"max_steps must be an integer ≥ 100; got {max_steps!r}")
    from .infer import registry

    sg = registry.get(sampler).kind == "sgmcmc"
    plans = []

    def run(p, run_seed, what):
        if sg:
            plan = _sg_plan(p, sampler, kw, warmup, draws, int(max_steps), what)
            plans.append(plan)
            opts = {**kw, "step_size": plan["step_size"], "thin": plan["thin"]}
            return p.sample(
                sampler,
                chains=chains,
                warmup=plan["warmup"],
                draws=draws,
                seed=run_seed,
                progress=progress,
                **opts,
            )
        return p.sample(
            sampler,
            chains=chains,
            warmup=300 if warmup is None else warmup,
            draws=draws,
            seed=run_seed,
            progress=progress,
            **kw,
        )

    if pilot is None:
        pilot = run(post._replace(constraints=[]), seed, "the unconstrained pilot")
    W = torch.as_tensor(pilot.flat().reshape(-1, post.d), dtype=post.dtype, device=post.device)
    new_specs, report = [], {}
    for spec, bound in zip(specs, post._bound, strict=True):
        todo = constraints is None or bound.name in constraints
        if not todo:
            new_specs.append(spec)
            continue
        if bound.family not in ("gaussian", "cka"):
            warn(
                f"calibrate: {bound.name!r} has a {bound.family} defect; its strength is kept",
                ConstraintWarning,
            )
            new_specs.append(spec)
            continue
        rank = k = None
        if bound.family == "cka":  # scalar feature: D itself, its spread is E[D]
            with torch.no_grad():
                Dv = torch.stack([bound.defect(post.view(w)) for w in W[:: max(1, len(W) // 400)]])
            v = np.array([float(Dv.mean())])
            method = "cka-mean-defect"
        else:
            F = _feature_draws(post, bound, W).to(torch.float64)
            rank = _local_rank(post, bound)
            Fc = F - F.mean(0, keepdim=True)
            S, k = Fc.shape
            if S > k:
                v = torch.linalg.eigvalsh(Fc.T @ Fc / (S - 1)).numpy()
                method = "eigen"
            else:  # the sample covariance's non-zero spectrum, from the S×S Gram matrix
                lam = torch.linalg.eigvalsh(Fc @ Fc.T / (S - 1)).numpy()
                v = np.concatenate([lam, np.zeros(k - S)])
                method = "eigen-gram"
            if rank is not None and rank < k:
                # locally only rank(J_f) directions of the feature can move; the pilot's
                # other eigenvalues come from curvature (nonlinear spread), and the
                # constraint cannot pin them below that: drop them so the reachable
                # binding is rank/k, as it is for the sampled posterior
                v = np.sort(v)[::-1].copy()
                v[rank:] = 0.0
                method += f"-rank{rank}"
        try:
            sigma2 = solve_tolerance(v, target_binding)
        except ValueError as e:
            raise ValueError(
                f"calibrate: constraint {bound.name!r}: {e}"
                + (
                    f" The feature has k={k} entries but its Jacobian at w* has rank {rank}"
                    f" (only {rank} independent directions of the lifted weights move it),"
                    f" so no tolerance makes it bind above {rank / k:.3f}."
                    if rank is not None and rank < k
                    else ""
                )
            ) from None
        k = bound.k
        alpha = k / (2.0 * sigma2 * post.nbeta)
        new = copy.copy(spec)
        new.tolerance, new.strength, new.n_c = None, alpha, None
        new.name = bound.name
        new_specs.append(new)
        report[bound.name] = {
            "sigma": math.sqrt(sigma2),
            "strength": alpha,
            "target_binding": target_binding,
            "method": method,
            "trace_V": float(np.sum(v)),
            "k": k,
            "jacobian_rank": rank,
            "_spectrum": v,
        }
    out = post._replace(constraints=new_specs)
    if int(refine) < 0:
        raise ValueError(f"refine must be a non-negative integer; got {refine!r}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must lie in (0, 1); got {tol!r}")
    for it in range(int(refine)):
        ref = run(out, seed + 1 + it, f"refinement run {it + 1}")
        defects = ref.defects()
        done = True
        new_specs = []
        for spec, bound in zip(out._specs, out._bound, strict=True):
            info = report.get(bound.name)
            if info is None or info["method"] == "cka-mean-defect":
                new_specs.append(spec)
                continue
            b_hat = float(2.0 * bound.rho * defects[bound.name].mean() / bound.k)
            info.setdefault("history", []).append((info["sigma"], b_hat))
            info["achieved_binding"] = b_hat
            if abs(b_hat - target_binding) <= tol:
                new_specs.append(spec)
                continue
            done = False
            v = info["_spectrum"]
            s2 = info["sigma"] ** 2
            # the spectrum model at σ² reproduces b̂ when v is scaled by c = σ²/s̃², where
            # b_model(s̃²) = b̂; solve for b* with the scaled spectrum
            b_hat_c = min(max(b_hat, 1e-6), np.count_nonzero(v > 0) / len(v) - 1e-6)
            c = s2 / solve_tolerance(v, b_hat_c)
            sigma2 = c * solve_tolerance(v, target_binding)
            alpha = bound.k / (2.0 * sigma2 * out.nbeta)
            new = copy.copy(spec)
            new.tolerance, new.strength, new.n_c = None, alpha, None
            new_specs.append(new)
            info.update(sigma=math.sqrt(sigma2), strength=alpha, method=info["method"] + "+refined")
        if done:
            break
        out = out._replace(constraints=new_specs)
    for info in report.values():
        info.pop("_spectrum", None)
        hist = info.get("history")
        if hist:  # converged: the last measured run used the final σ and hit the target
            last_sigma, last_b = hist[-1]
            info["converged"] = bool(
                last_sigma == info["sigma"] and abs(last_b - target_binding) <= tol
            )
    for info in report.values():
        info["sampler"] = sampler
        if plans:
            info["runs"] = plans
    out.calibration = report
    return out


def _sg_plan(post, method, kw, warmup, draws, max_steps, what) -> dict:
    """Step size, warmup and thinning of one SG-MCMC run of ``post`` (see ``calibrate``).

    Raises ``ValueError`` with the reason when the run cannot relax within ``max_steps``."""
    from .stepsize import top_curvature

    h = top_curvature(post)
    gam = float(post.localization)
    fr = float(kw.get("friction", 0.1))
    if method == "sgld":
        bound = 0.2 / h
    elif method == "rmsprop_sgld":
        bound = 0.2 / math.sqrt(h)
    else:
        bound = 0.1 / h
    given = kw.get("step_size")
    if given is None or (isinstance(given, str) and given.lower() == "auto"):
        step, note = bound, "the accuracy bound"
    else:
        step = float(given)
        note = "as given"
        if step > bound:
            step, note = bound, f"reduced from {float(given):.3g} to the accuracy bound"
    # relaxation of the slowest (localizer-held, curvature γ) directions' spread to 2%
    if method in ("sghmc", "sgnht"):
        relax = 4.0 * max(fr / (step * gam), 1.0 / math.sqrt(step * gam))
    elif method == "rmsprop_sgld":
        relax = 4.0 / (step * math.sqrt(gam))  # G ≈ 1/√γ where only the localizer holds
    else:
        relax = 4.0 / (step * gam)
    relax = int(math.ceil(relax))
    need_warm = max(relax, 0 if warmup is None else int(warmup))
    thin = max(1, int(math.ceil(relax / 16)))
    if need_warm + draws > max_steps:
        raise ValueError(
            f"calibrate: {what} cannot be sampled accurately with {method} within "
            f"max_steps={max_steps} steps per chain. The top curvature of its potential is "
            f"h_max = {h:.3g}, so the largest step whose bias stays within 5% is "
            f"{bound:.3g}, and at that step the directions held only by the localizer "
            f"(γ = {gam:g}) need about {relax:,} steps to relax (plus {draws} draws). "
            + (
                "The constraints' tolerance makes the potential this stiff: ask for a "
                "lower target binding, "
                if post.constraints
                else ""
            )
            + "raise max_steps, or use NUTS (method='nuts') if the network is small enough."
        )
    thin = max(1, min(thin, (max_steps - need_warm) // max(draws, 1)))
    return {
        "what": what,
        "h_max": h,
        "step_size": step,
        "step_note": note,
        "warmup": need_warm,
        "thin": thin,
        "relaxation_steps": relax,
    }


@dataclass(frozen=True)
class Sensitivity:
    """``dE[φ]/dh = −Cov(φ, V)`` with its Monte Carlo standard error (docs/theory.md §3.3).

    ``float(s)`` is ``s.value``.

    Attributes
    ----------
    value : float
        The derivative of ``E[φ]`` with respect to the knob (in the ``wrt`` parameter).
    stderr : float
        Its Monte Carlo standard error.
    knob : str
        ``"nbeta"`` or the constraint name.
    wrt : str
        ``"rho"``, ``"strength"`` or ``"tolerance"``.
    """

    value: float
    stderr: float
    knob: str
    wrt: str

    def __float__(self) -> float:
        return self.value


def _observable(ref: ReferenceClass, observable) -> np.ndarray:
    shape = (ref.chains, ref.num_draws)
    if isinstance(observable, str):
        if observable == "loss":
            return ref.loss()
        if observable.startswith("defect:"):
            return ref.defects()[observable[len("defect:") :]]
        raise ValueError(f"observable string must be 'loss' or 'defect:<name>'; got {observable!r}")
    if callable(observable):
        post = ref._need_posterior("sensitivity with a callable observable")
        W = torch.as_tensor(ref.flat().reshape(-1, ref.d), dtype=post.dtype)
        with torch.no_grad():
            vals = torch.stack([torch.as_tensor(observable(post.view(w))).reshape(()) for w in W])
        return vals.numpy().reshape(shape)
    arr = np.asarray(observable, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(
            f"observable array must have shape [chains, draws] = {shape}; got {arr.shape}"
        )
    return arr


def sensitivity(ref: ReferenceClass, observable, knob: str, *, wrt: str = "rho") -> Sensitivity:
    """Linear response ``dE[φ]/dh = −Cov(φ, V)`` from draws already taken (docs/theory.md §3.3).

    Parameters
    ----------
    ref : ReferenceClass
        The draws (attached to their posterior when ``observable`` is a callable).
    observable : str, callable or numpy.ndarray
        φ: ``"loss"`` (``L_n``), ``"defect:<name>"``, a callable ``view -> scalar``
        evaluated on every draw, or per-draw values of shape ``[chains, draws]``.
    knob : str
        ``"nbeta"`` or a constraint name.
        ``"nbeta"``: ``h = nβ``, ``V = L_n``. A constraint name: ``h = ρ_c``, ``V = D_c``.
    wrt : {"rho", "strength", "tolerance"}
        For a constraint, report the derivative with respect to ρ_c, to the relative
        strength α (``ρ = nβ·α·N_c/n``), or to the tolerance σ (``ρ = k/(2σ²)``).

    Returns
    -------
    Sensitivity
        The derivative and its Monte Carlo standard error.
    """
    phi = _observable(ref, observable)
    if knob == "nbeta":
        V = ref.loss()
        factor = 1.0
    else:
        defects = ref.defects()
        if knob not in defects:
            raise ValueError(
                f"knob must be 'nbeta' or a constraint name {list(defects)}; got {knob!r}"
            )
        V = defects[knob]
        cfg = next(c for c in ref.config["constraints"] if c["name"] == knob)
        if wrt == "rho":
            factor = 1.0
        elif wrt == "strength":
            if cfg.get("strength") is None:
                raise ValueError(f"{knob!r} was declared with a tolerance; use wrt='tolerance'")
            factor = cfg["rho"] / cfg["strength"]
        elif wrt == "tolerance":
            if cfg.get("tolerance") is None:
                raise ValueError(f"{knob!r} was declared with a strength; use wrt='strength'")
            factor = -cfg["k"] / cfg["tolerance"] ** 3
        else:
            raise ValueError(f"wrt must be 'rho', 'strength' or 'tolerance'; got {wrt!r}")
    from .diagnostics import mcse_mean

    z = (phi - phi.mean()) * (V - V.mean())
    cov = float(z.mean())
    try:
        se = float(mcse_mean(z))
    except ValueError:
        se = float("nan")
    return Sensitivity(value=-cov * factor, stderr=abs(se * factor), knob=knob, wrt=wrt)
