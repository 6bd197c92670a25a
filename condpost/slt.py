"""Learning coefficients from draws (THEORY §1.4, §3.1, §4.2, §5.4)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ._errors import SamplerWarning, warn

__all__ = ["LLC", "llc_from_losses"]


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
        ``λ̂_{L|C}``, not a learning coefficient (THEORY §3.1.2).
    method : str
        The sampler that produced the draws (``"nuts"``, ``"hmc"``, ``"svi"``).
    notes : tuple of str
        Caveats attached to the estimate (e.g. that SVI draws under-disperse).
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

    def __float__(self) -> float:
        return float(self.mean)

    def __str__(self) -> str:
        what = "λ̂_{L|C} (constrained loss part)" if self.constrained else "λ̂ (LLC)"
        s = (
            f"{what} = {self.mean:.4g} ± {self.stderr:.2g} (MC s.e.), std over "
            f"{len(self.per_chain)} chain(s) {self.std:.3g}  [nβ={self.nbeta:.4g}, "
            f"γ={self.localization:g}, n={self.n}]"
        )
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
    """Compute ``LLC`` from per-draw losses ``[chains, draws]``."""
    from .diagnostics import mcse_mean

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
        stderr = float(nbeta * mcse_mean(L))
    except ValueError:
        stderr = float("nan")
    notes = []
    if method == "svi":
        notes.append(
            "from a Gaussian variational fit: it under-disperses on singular posteriors; "
            "cross-check with MCMC before reporting (THEORY §1.5)"
        )
        if warn_negative:
            warn("λ̂ from SVI draws: " + notes[-1], SamplerWarning)
    if mean < 0 and warn_negative:
        gap = d / (2 * nbeta)
        warn(
            f"λ̂ = {mean:.4g} is negative, which is never a valid complexity. The draws have "
            f"lower loss than w*: w* is not a local minimum of L_n. In the regular case "
            f"E[λ̂] = d/2 − nβ·(L_n(w*) − min L_n) (THEORY §4.2), so a loss gap above "
            f"d/(2nβ) = {gap:.3g} nats already makes λ̂ negative. Refine w* with a few "
            f"full-batch optimisation steps, increase localization, or lower nβ.",
            SamplerWarning,
        )
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
    )
