"""The local learning coefficient from a reference class's losses (docs/theory.md §1.4, §4.2, §5.4).

``LLC`` and the estimators behind ``ReferenceClass.llc()``: the plain estimator
``λ̂ = nβ(E[L_n] − L_n(w*))`` for exact samplers and the SG-MCMC estimator with its
bias and step-size checks. This module reads only per-draw statistics, so the
reference layer can use it without importing any sampler.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ._errors import SamplerWarning, warn

__all__ = ["LLC", "llc_from_losses", "llc_sgmcmc"]


@dataclass(frozen=True)
class LLC:
    """Local learning coefficient estimate ``λ̂ = nβ (E[L_n] − L_n(w*))``.

    Attributes
    ----------
    mean : float
        λ̂ over all draws.
    std : float
        Standard deviation of the per-chain estimates (NaN with one chain).
    stderr : float
        Monte Carlo standard error of ``mean`` from the effective sample size of L_n.
    per_chain : numpy.ndarray
        λ̂ of each chain.
    nbeta : float
        The inverse temperature nβ at which it was measured; λ̂ is meaningful only
        with it and γ.
    localization : float
        The localization γ at which it was measured.
    n : int
        Number of training samples behind ``L_n``.
    loss_center : float
        ``L_n(w*)``, the reference loss subtracted from ``E[L_n]``.
    constrained : bool
        True if constraints were active: then this is the constrained loss part
        ``λ̂_{L|C}``, not a learning coefficient (docs/theory.md §3.1.2).
    method : str
        The sampler that produced the draws (``"nuts"``, ``"hmc"``, ``"svi"``).
    notes : tuple of str
        Caveats attached to the estimate (e.g. that SVI draws under-disperse).
    stderr_detail : dict
        How ``stderr`` was obtained: the ESS-based, batch-means and chain-means errors
        (``condpost.diagnostics.mcse_mean_robust``), which one was the largest
        (``source``; the reported one), and the baseline's error for SG-MCMC runs.
    discarded : int
        Kept draws per chain left out at the start (``draws="auto"`` drops a start
        that is still trending); 0 for a plain run.
    run : dict
        For ``condpost.auto``: the rounds, the criteria and which one ended the run
        (``run["stop_reason"]``); empty otherwise.
    """

    mean: float
    std: float
    stderr: float
    per_chain: np.ndarray
    nbeta: float
    localization: float
    n: int
    loss_center: float
    constrained: bool = False
    method: str = "nuts"
    notes: tuple[str, ...] = field(default_factory=tuple)
    stderr_detail: dict = field(default_factory=dict)
    discarded: int = 0
    run: dict = field(default_factory=dict)

    def __float__(self) -> float:
        return float(self.mean)

    def __str__(self) -> str:
        what = "λ̂_{L|C} (constrained loss part)" if self.constrained else "λ̂ (LLC)"
        s = (
            f"{what} = {self.mean:.4g} ± {self.stderr:.2g} (MC s.e.), std over "
            f"{len(self.per_chain)} chain(s) {self.std:.3g}  [nβ={self.nbeta:.4g}, "
            f"γ={self.localization:g}, n={self.n}]"
        )
        if self.run.get("stop_reason"):
            s += f"  (draws='auto': {self.run['stop_reason']})"
        return s


def llc_from_losses(
    losses: np.ndarray,
    loss_center: float,
    nbeta: float,
    localization: float,
    n: int,
    d: int,
    *,
    constrained: bool = False,
    method: str = "nuts",
    warn_negative: bool = True,
) -> LLC:
    """Compute ``LLC`` from per-draw losses ``[chains, draws]``.

    ``stderr`` is ``nβ·mcse_mean_robust(L)``: the largest of the ESS-based, batch-means
    and chain-means (t-widened) errors, so that it includes the spread between chains and
    a drift common to them (docs/llc.md). With ``warn_negative`` (the user-facing default)
    a negative λ̂ and a λ̂ at the floor of a saturated loss are explained in a warning.
    """
    from .diagnostics import mcse_mean_robust

    L = np.asarray(losses, dtype=np.float64)
    if L.ndim != 2:
        raise ValueError(f"losses must have shape [chains, draws]; got {L.shape}")
    bad = ~np.isfinite(L)
    if bad.any():
        c, s = np.argwhere(bad)[0]
        raise FloatingPointError(
            f"L_n is non-finite at {int(bad.sum())} draw(s), the first at chain {c}, draw {s}: a "
            f"chain diverged. λ̂ is undefined; lower the step size, raise target_accept or "
            f"localization."
        )
    per_chain = nbeta * (L.mean(axis=1) - loss_center)
    mean = float(nbeta * (L.mean() - loss_center))
    std = float(per_chain.std(ddof=1)) if L.shape[0] > 1 else float("nan")
    try:
        err = mcse_mean_robust(L)
        stderr = float(nbeta * err.stderr)
        detail = {
            "ess": float(nbeta * err.ess),
            "batch_means": float(nbeta * err.batch_means),
            "chain_means": float(nbeta * err.chain_means),
            "source": err.source,
        }
    except ValueError:
        stderr, detail = float("nan"), {}
    notes = []
    if method == "svi":
        notes.append(
            "from a Gaussian variational fit: it under-disperses on singular posteriors; "
            "cross-check with MCMC before reporting (docs/theory.md §1.5)"
        )
        if warn_negative:
            warn("λ̂ from SVI draws: " + notes[-1], SamplerWarning)
    sat = saturation_message(mean, loss_center, nbeta, d)
    if mean < 0 and warn_negative and sat is None:
        gap = d / (2 * nbeta)
        warn(
            f"λ̂ = {mean:.4g} is negative, which is never a valid complexity. The draws have "
            f"lower loss than w*: w* is not a local minimum of L_n. In the regular case "
            f"E[λ̂] = d/2 − nβ·(L_n(w*) − min L_n) (docs/theory.md §4.2), so a loss gap above "
            f"d/(2nβ) = {gap:.3g} nats already makes λ̂ negative. Refine w* with a few "
            f"full-batch optimisation steps, increase localization, or lower nβ.",
            SamplerWarning,
        )
    if sat is not None:
        notes.append(sat)
        if warn_negative:
            warn(sat, SamplerWarning)
    return LLC(
        mean=mean,
        std=std,
        stderr=stderr,
        per_chain=per_chain,
        nbeta=float(nbeta),
        localization=float(localization),
        n=int(n),
        loss_center=float(loss_center),
        constrained=constrained,
        method=method,
        notes=tuple(notes),
        stderr_detail=detail,
    )


def saturation_message(mean: float, loss_center: float, nbeta: float, d: int) -> str | None:
    """The plain-words reason for a λ̂ stuck near 0 at a loss floor, or None.

    A classifier that fits its data with ever larger margins has ``L_n(w*) → 0``; then
    ``nβ(L_n(w) − L_n(w*))`` can only be as large as the loss can grow within the
    localizer's reach, and directions that only sharpen the margins change the loss by
    ``O(L_n(w*))``. λ̂ comes out near 0 (e.g. 1e-7 at a loss of 6e-8), which says that the
    loss is saturated at this nβ, not that the network is simple.
    """
    if not (np.isfinite(mean) and np.isfinite(loss_center)):
        return None
    if 0 <= loss_center < 1e-3 and abs(mean) < 1e-2 and nbeta * loss_center < 1.0:
        return (
            f"λ̂ = {mean:.3g} is at the floor: the loss at w* is L_n(w*) = {loss_center:.3g} "
            f"nats, so close to its minimum 0 (a saturated classifier: every margin is huge) "
            f"that nβ·(L_n(w) − L_n(w*)) has no room to grow (nβ·L_n(w*) = "
            f"{nbeta * loss_center:.3g}). This is not a measure of the network's complexity "
            f"(a regular model with d = {d} would give about {d / 2:g}). Raise nβ until "
            f"nβ·L_n(w*) is of order 1 or more, train with label smoothing (or stop "
            f"training earlier, or add a small weight decay) so that w* is not at the loss "
            f"floor, or measure the LLC on held-out data where the loss is not saturated."
        )
    return None


# ---------------------------------------------------------------------------------------
# SG-MCMC: estimator bookkeeping and plain-words diagnostics
# ---------------------------------------------------------------------------------------

_ESTIMATOR_NOTES = {
    "independent": "per-draw L_n from an independent random batch paired with w* on the same "
    "batch (L_n(w*) + L_B(w) − L_B(w*)); baseline L_n(w*) on the full data",
    "gradient": "per-draw L_n from the next step's (independent, with-replacement) gradient "
    "batch, paired with w* on the same batch; baseline L_n(w*) on the full data",
    "full": "per-draw L_n on the full data; baseline L_n(w*) on the full data",
}


def llc_sgmcmc(
    ref, *, estimator: str | None = None, warn_user: bool = True, discard: int = 0
) -> LLC:
    """λ̂ of an SG-MCMC ``ReferenceClass`` with its estimator notes and diagnostics.

    ``λ̂ = nβ (mean_draws L̂_n(w) − L_n(w*))`` where ``L̂_n`` is the run's loss estimator
    (``ref.settings["loss_estimator"]``), or the full-data losses recorded every
    ``full_loss_every`` draws with ``estimator="full"``. The MC standard error is
    ``nβ·mcse(L̂_n)`` (ESS-based, so it includes the loss-batch noise), combined in
    quadrature with ``nβ·se(L_n(w*))`` when the baseline was estimated from batches.

    Diagnostics (docs/theory.md §5.2–5.4), warned in plain words and kept in ``notes``:
    a negative λ̂; the loss trace sitting below ``L_n(w*)`` (a lower basin: localization
    too weak or ``w*`` not a minimum); ``‖w − w*‖²`` still growing in the second half
    (too-weak localization or not yet stationary); λ̂ drifting between the halves of the
    run; chains disagreeing (split R-hat of the loss > 1.01); the localizer dominating the
    spread (``γE‖w−w*‖²/d`` close to 1); and the centre check of the posterior (w* not
    at a minimum); a λ̂ at the floor of a saturated loss.

    ``discard`` leaves out the first ``discard`` kept draws of every chain (the loss
    measurements at or after draw ``discard``; ``condpost.auto`` drops a start that is
    still trending).
    """
    from .diagnostics import mcse_mean, split_rhat

    settings, config = ref.settings, ref.config
    if settings.get("global_prior"):
        raise ValueError(
            "this run sampled a global posterior (for WBIC), not the local posterior at w*: "
            "λ̂ is not defined for it"
        )
    est = settings.get("loss_estimator", "independent")
    if estimator in (None, est):
        losses = ref.loss()
        what = est
        every = int(settings.get("loss_every") or 1)
    elif estimator == "full":
        if "loss_full" not in ref._stats:
            raise ValueError(
                "estimator='full' needs full-data losses: sample with full_loss_every=k (or "
                "loss='full')"
            )
        losses, what = ref.stat("loss_full"), "full"
        every = int(settings.get("full_loss_every") or 1)
    else:
        raise ValueError(
            f"estimator={estimator!r}: choose None (the run's estimator, {est!r}) or 'full'"
        )
    if isinstance(discard, bool) or int(discard) != discard or discard < 0:
        raise ValueError(f"discard must be an integer ≥ 0 (kept draws per chain); got {discard!r}")
    discard = int(discard)
    if discard:
        skip = -(-discard // every)
        losses = np.asarray(losses)[:, skip:]
        if losses.shape[1] < 4:
            raise ValueError(
                f"discard={discard} leaves {losses.shape[1]} loss measurements per chain; "
                f"λ̂ needs at least 4"
            )
    nbeta = ref.nbeta
    base_se = float(settings.get("baseline_stderr") or 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplerWarning)
        res = llc_from_losses(
            losses,
            config["loss_center"],
            nbeta,
            ref.localization,
            config["n"],
            ref.d,
            constrained=bool(config["constraints"]),
            method=settings.get("method", "sgld"),
            warn_negative=False,
        )
    stderr = float(np.hypot(res.stderr, nbeta * base_se))
    detail = dict(res.stderr_detail, baseline=float(nbeta * base_se))
    notes = [f"loss estimator: {_ESTIMATOR_NOTES.get(what, what)}"]
    if discard:
        notes.append(f"the first {discard} kept draws of every chain are left out")
    msgs = []
    L = np.asarray(losses, dtype=np.float64)
    sat = saturation_message(res.mean, config["loss_center"], nbeta, ref.d)
    if res.mean < 0 and sat is None:
        msgs.append(
            f"λ̂ = {res.mean:.4g} is negative, which is never a valid complexity: the chains "
            f"found lower loss than w*. w* is not a local minimum of L_n (E[λ̂] = d/2 − "
            f"nβ·(L_n(w*) − min L_n) in the regular case, docs/theory.md §4.2: a gap above "
            f"d/(2nβ) = {ref.d / (2 * nbeta):.3g} nats suffices), or localization is too weak. "
            f"Refine w* with a few full-batch optimisation steps, increase localization, or "
            f"lower nβ."
        )
    S = L.shape[1]
    if S >= 8:
        half = S // 2
        a, b = L[:, :half], L[:, half:]
        try:
            se_a, se_b = float(mcse_mean(a)), float(mcse_mean(b))
        except ValueError:
            se_a = se_b = float("nan")
        d_half = nbeta * (b.mean() - a.mean())
        se_half = nbeta * float(np.hypot(se_a, se_b))
        if (
            np.isfinite(se_half)
            and abs(d_half) > 4 * se_half
            and abs(d_half) > 0.05 * max(abs(res.mean), 1e-12)
        ):
            msgs.append(
                f"λ̂ drifts during the run: the second half reads {d_half:+.3g} against the "
                f"first (± {se_half:.2g}). The chains are not stationary yet: lengthen warmup, "
                f"or, if λ̂ keeps falling, localization is too weak (the chains wander into a "
                f"lower region)."
            )
        below = (b.mean(axis=1) < config["loss_center"]).mean()
        if below > 0.5 and res.mean >= 0:
            msgs.append(
                f"the loss of {below:.0%} of the chains sits below L_n(w*) in the second half: "
                f"they found a lower region near w*. w* is not at a minimum or localization is "
                f"too weak; refine w* or increase localization."
            )
        if L.shape[0] > 1:
            try:
                rh = float(split_rhat(L))
            except ValueError:
                rh = float("nan")
            if np.isfinite(rh) and rh > 1.01:
                msgs.append(
                    f"chains disagree on L_n (split R-hat {rh:.3f} > 1.01): draw longer, use a "
                    f"longer warmup, or check for multimodality (weak localization)."
                )
    if "dist2" in ref._stats and ref._stats["dist2"].shape[1] - discard >= 8:
        D2 = np.asarray(ref._stats["dist2"])[:, discard:]
        q = D2.shape[1] // 4
        early, late = D2[:, q : 2 * q].mean(), D2[:, 3 * q :].mean()
        if early > 0 and late > 1.25 * early:
            msgs.append(
                f"‖w − w*‖² keeps growing ({early:.3g} → {late:.3g} between the second and last "
                f"quarters): the chains have not reached a plateau. Localization may be too weak "
                f"(increase it) or warmup too short."
            )
        dom = ref.localization * D2.mean() / ref.d
        if dom > 0.9:
            msgs.append(
                f"the localizer sets the spread: γ·E‖w − w*‖²/d = {dom:.2f} ≈ 1, so the loss "
                f"barely constrains the draws and λ̂ mostly measures γ (docs/theory.md §5.2). Lower "
                f"localization or raise nβ."
            )
    shift = (config.get("center_check") or {}).get("lambda_shift", 0.0)
    if shift is not None and shift < -0.5:
        msgs.append(
            f"the centre check found w* away from a minimum: in the local quadratic model λ̂ "
            f"is lowered by about {-shift:.3g} (docs/theory.md §4.2). Refine w* before trusting λ̂."
        )
    if sat is not None:
        msgs.append(sat)
    if warn_user:
        for m in msgs:
            warn(m, SamplerWarning)
    return LLC(
        mean=res.mean,
        std=res.std,
        stderr=stderr,
        per_chain=res.per_chain,
        nbeta=res.nbeta,
        localization=res.localization,
        n=res.n,
        loss_center=res.loss_center,
        constrained=res.constrained,
        method=res.method,
        notes=tuple(notes + msgs),
        stderr_detail=detail,
        discarded=discard,
    )
