"""Step-size calibration for the SG-MCMC samplers (docs/theory.md §5.3).

``calibrate_step_size(post, method="sgld")`` runs a few short vectorized chains from
``w*`` at every step size of a grid and reports, per step size:

* **plateau** — the loss trace must rise from ``L_n(w*)`` and flatten. We fit a line to
  the chain-averaged ``nβ·(L_B(w) − L_B(w*))`` over the last half of the run; ``drift`` is
  the fitted change across that half (in λ̂ units), and the trace is on a plateau when
  ``|drift|`` is below ``max(0.1·|λ̂|, 3·se(drift))``, with ``se(drift) = √12·se(mean)``
  (a least-squares line's end-to-end change over a stationary trace) and ``se(mean)``
  from the effective sample size of the detrended traces. Too small a step size never reaches the
  plateau within the run (λ̂ still rising).
* **virial** — ``E[(w − w*)·∇U(w)]/d`` over the last half, which equals 1 for exact
  draws from ``e^{−U}`` (docs/theory.md §5.2). Too large a step size inflates the spread, so the
  ratio rises above 1; a chain still relaxing reads below 1.
* **accept** — a MALA-style acceptance proxy (the Metropolis–Hastings acceptance of the
  Langevin proposal on the step's own minibatch, Roberts & Tweedie 1996; the devinterp
  notebooks target about 0.9): ``min(1, exp(U_B(w) − U_B(w') + log q(w|w') − log q(w'|w)))``
  with ``q(w'|w) = N(w'; w − (ε/2)G∇U_B(w), εG)`` (``G = I`` for SGLD, the frozen
  RMSProp preconditioner for RMSProp-SGLD). Values near 1 mean the discretisation error
  is small; values well below 0.9 mean the step is too large. Not defined for SGHMC
  (reported as NaN).
* **llc** — the λ̂ read from the last half (a rough value: short run, few chains).

**Recommendation**: the largest step size that did not diverge, is on a plateau, has
``|virial − 1| ≤ virial_tol`` (default 0.05, or 3 standard errors if larger) and an
acceptance proxy ≥ ``target_accept`` (default 0.99). The largest such step mixes fastest
while its bias stays small. The default is stricter than the 0.9 of the devinterp
notebooks on purpose: on docs/theory.md §4.2's regular model (nβ = 145, batch 200) the relative
bias of λ̂ is about 4·(1 − accept) (ε = 1e-4: accept 0.9995, bias 0.6%; 3e-4: 0.9975, 2%;
1e-3: 0.987, 6%; 3e-3: 0.95, 18%), so 0.9 allows tens of percent. The virial ratio
is the sharper check in long runs, but in a short calibration run its Monte Carlo error
(≈ 0.1 at small ε) hides a few percent of bias, while the acceptance proxy does not. If none qualifies, nothing is recommended and the table
says why; lengthen ``steps`` (no plateau) or extend the grid downwards (virial/accept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._errors import SamplerWarning, warn

if TYPE_CHECKING:  # pragma: no cover
    from .posterior import LocalPosterior

__all__ = ["calibrate_step_size", "StepSizeCalibration"]


@dataclass
class StepSizeCalibration:
    """Result of ``calibrate_step_size``: one row per step size and a recommendation.

    Attributes
    ----------
    rows : list of dict
        ``step_size``, ``status`` (``"ok"`` or the reasons it failed), ``llc``, ``llc_se``,
        ``drift``, ``plateau``, ``virial``, ``virial_se``, ``accept``.
    recommended : float or None
        The recommended step size (``None`` when none qualifies).
    traces : dict
        ``step_size → [chains, steps]`` array of ``nβ·(L_B(w) − L_B(w*))``.
    """

    method: str
    rows: list[dict]
    recommended: float | None
    traces: dict = field(repr=False, default_factory=dict)
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        from .reference import _table

        cols = [
            "step_size",
            "llc",
            "llc_se",
            "drift",
            "plateau",
            "virial",
            "virial_se",
            "accept",
            "status",
        ]
        return _table(self.rows, cols)

    def __str__(self) -> str:
        rec = (
            f"recommended step_size = {self.recommended:.3g}"
            if self.recommended is not None
            else "no step size qualifies (see status): lengthen steps or extend the grid"
        )
        return (
            f"{self.method} step-size calibration ({self.settings.get('chains')} chains × "
            f"{self.settings.get('steps')} steps each; criteria: plateau, |virial − 1| ≤ "
            f"{self.settings.get('virial_tol')}, accept ≥ {self.settings.get('target_accept')})\n"
            f"{self.table()}\n{rec}"
        )

    __repr__ = __str__

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(self.rows).set_index("step_size")


def calibrate_step_size(
    post: LocalPosterior,
    method: str = "sgld",
    step_sizes=None,
    *,
    chains: int = 4,
    steps: int = 1000,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    target_accept: float = 0.99,
    virial_tol: float = 0.05,
    warn_user: bool = True,
    **kernel_kw,
) -> StepSizeCalibration:
    """Run short chains over a grid of step sizes and recommend one (see module docs).

    Parameters
    ----------
    post : LocalPosterior
    method : {"sgld", "rmsprop_sgld", "sghmc", "sgnht"}
    step_sizes : sequence of float, optional
        Grid (default ``10^{-7} … 10^{-2}``, half-decade spacing).
    chains, steps : int
        Chains per step size (default 4) and steps per chain (default 1000).
    batch_size : int, optional
        Minibatch size (default ``min(n, 256)``; use the one you will sample with).
    seed : int
    progress : bool
        Show a progress bar over the grid.
    target_accept : float
        Minimum acceptance proxy (default 0.99; see the module docs).
    virial_tol : float
        Allowed ``|virial − 1|`` (default 0.05).
    **kernel_kw
        Passed to the kernel (``friction``, ``alpha``, ``eps``, ``compile``).
    """
    from tqdm.auto import tqdm

    from .infer.sgmcmc import _center_batch_loss, _check_method, make_kernel

    method = _check_method(method)
    if step_sizes is None:
        step_sizes = [float(10**e) for e in np.arange(-7, -1.99, 0.5)]
    grid = sorted(float(s) for s in np.atleast_1d(step_sizes))
    if not grid or any(not (math.isfinite(s) and s > 0) for s in grid):
        raise ValueError(f"step_sizes must be positive finite numbers; got {step_sizes!r}")
    if int(steps) != steps or steps < 20:
        raise ValueError(f"steps must be an integer ≥ 20; got {steps!r}")
    if int(chains) != chains or chains < 1:
        raise ValueError(f"chains must be a positive integer; got {chains!r}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must lie in (0, 1); got {target_accept!r}")
    steps, chains = int(steps), int(chains)
    nb, d = post.nbeta, post.d
    rows, traces = [], {}
    bar = tqdm(total=len(grid) * steps, desc=f"calibrate {method}", disable=not progress)
    try:
        for eps in grid:
            kernel = make_kernel(post, method, step_size=eps, batch_size=batch_size, **kernel_kw)
            pot = kernel.potential_and_grad
            state = kernel.init(chains, seed)
            tr = np.full((chains, steps), np.nan)
            vir = np.full((chains, steps), np.nan)
            acc = np.full((chains, steps), np.nan)
            status = "ok"
            for t in range(steps):
                if method == "rmsprop_sgld" and t >= steps // 2:
                    state = state._replace(adapting=False)
                w0 = state.w
                try:
                    state, info = kernel.step(None, state)
                except FloatingPointError:
                    status = f"diverged at step {t}"
                    break
                if not bool(torch.isfinite(info.potential).all()) or not bool(
                    torch.isfinite(state.w).all()
                ):
                    status = f"diverged at step {t}"
                    break
                XB, YB = info.batch
                tr[:, t] = (nb * (info.loss - _center_batch_loss(post, XB, YB))).cpu().numpy()
                vir[:, t] = (info.virial / d).cpu().numpy()
                if method not in ("sghmc", "sgnht"):
                    g1, u1, _ = pot(state.w, XB, YB)
                    G = 1.0 if info.precond is None else info.precond
                    fwd = state.w - w0 + 0.5 * eps * G * info.grad
                    bwd = w0 - state.w + 0.5 * eps * G * g1
                    log_a = (
                        info.potential
                        - u1
                        - ((bwd * bwd) / (2 * eps * G)).sum(-1)
                        + ((fwd * fwd) / (2 * eps * G)).sum(-1)
                    )
                    acc[:, t] = torch.clamp(log_a, max=0.0).exp().cpu().numpy()
                bar.update(1)
            traces[eps] = tr
            rows.append(_row(eps, tr, vir, acc, status, steps, virial_tol, target_accept, method))
            if status != "ok":
                bar.update(steps - t - 1 if "diverged" in status else 0)
    finally:
        bar.close()
    ok = [r for r in rows if r["status"] == "ok"]
    rec = max((r["step_size"] for r in ok), default=None)
    res = StepSizeCalibration(
        method=method,
        rows=rows,
        recommended=rec,
        traces=traces,
        settings={
            "chains": chains,
            "steps": steps,
            "batch_size": batch_size,
            "seed": seed,
            "target_accept": target_accept,
            "virial_tol": virial_tol,
            "nbeta": nb,
            "localization": post.localization,
        },
    )
    if rec is None and warn_user:
        warn(
            "calibrate_step_size: no step size passed all checks (plateau, virial, acceptance); "
            "see the table. Lengthen steps if no trace reached a plateau, or extend the grid "
            "to smaller step sizes if the virial ratio or acceptance fail.",
            SamplerWarning,
        )
    return res


def _row(eps, tr, vir, acc, status, steps, virial_tol, target_accept, method) -> dict:
    row: dict = {"step_size": eps}
    half = steps // 2
    if status != "ok":
        row.update(
            llc=float("nan"),
            llc_se=float("nan"),
            drift=float("nan"),
            plateau=False,
            virial=float("nan"),
            virial_se=float("nan"),
            accept=float("nan"),
            status=status,
        )
        return row
    last = tr[:, half:]
    C = last.shape[0]
    llc = float(last.mean())
    # standard error from chains' batch means (4 batches per chain) — short runs, rough
    bm = last.reshape(C, 4, -1).mean(-1) if last.shape[1] >= 4 else last
    llc_se = float(bm.std(ddof=1) / math.sqrt(bm.size)) if bm.size > 1 else float("nan")
    N = last.shape[1]
    x = np.arange(N)
    slope, icpt = np.polyfit(x, last.mean(0), 1)
    drift = float(slope * N)
    # The fitted change across a window of N steps has variance 12·Var(mean) for a
    # stationary trace (OLS slope variance σ²/Σ(x − x̄)² = 12σ²/N³, times N²); Var(mean)
    # from the ESS of the detrended traces, which accounts for their autocorrelation.
    resid = last - (slope * x + icpt)
    if N >= 8:
        from .diagnostics import ess_basic

        ess = float(ess_basic(resid))
        sd = float(resid.std(ddof=1))
        se_mean = sd / math.sqrt(max(ess, 1.0)) if math.isfinite(ess) else llc_se
    else:
        se_mean = llc_se
    drift_se = math.sqrt(12.0) * se_mean
    plateau = abs(drift) <= max(0.1 * abs(llc), 3 * drift_se)
    v = vir[:, half:]
    vbm = v.reshape(C, 4, -1).mean(-1) if v.shape[1] >= 4 else v
    virial = float(v.mean())
    virial_se = float(vbm.std(ddof=1) / math.sqrt(vbm.size)) if vbm.size > 1 else float("nan")
    accept = float(np.nanmean(acc[:, half:])) if method not in ("sghmc", "sgnht") else float("nan")
    reasons = []
    if not plateau:
        reasons.append("no plateau" + (" (still rising)" if drift > 0 else " (falling)"))
    if abs(virial - 1) > max(virial_tol, 3 * virial_se):
        reasons.append("virial " + ("high" if virial > 1 else "low"))
    if method not in ("sghmc", "sgnht") and not accept >= target_accept:
        reasons.append("accept low")
    row.update(
        llc=llc,
        llc_se=llc_se,
        drift=drift,
        plateau=bool(plateau),
        virial=virial,
        virial_se=virial_se,
        accept=accept,
        status="ok" if not reasons else ", ".join(reasons),
    )
    return row
