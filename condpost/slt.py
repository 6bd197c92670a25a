"""Learning coefficients from draws (docs/theory.md §1.4, §3.1, §4.2, §5.4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .llc import LLC, llc_from_losses, llc_sgmcmc

__all__ = [
    "LLC",
    "WBIC",
    "llc_from_losses",
    "llc_sgmcmc",
    "refined_llc",
    "refined_posterior",
    "wbic",
]


# ---------------------------------------------------------------------------------------
# refined LLCs and WBIC (docs/theory.md §3.1.4–5)
# ---------------------------------------------------------------------------------------


def refined_posterior(
    post,
    *,
    include=None,
    exclude=None,
    data=None,
    nbeta=None,
    localization: float | None = None,
):
    """The declaration behind a weight- and/or data-refined LLC (Wang et al. 2024).

    * **weight-refined**: ``include``/``exclude`` select the component's parameters; only
      they are lifted (sampled), the rest stay at ``w*`` as constants.
    * **data-refined**: ``data=(x', y')`` replaces the dataset that defines ``L_n`` in both
      the sampler and the estimator: ``λ̂ = nβ (E_π'[L'(w)] − L'(w*))`` with
      ``π' ∝ exp(−nβ L'(w) − γ/2‖w − w*‖²)``.

    ``w*`` is the original posterior's centre (including any override). ``nbeta``
    defaults to the original specification (``"wbic"`` then means ``n'/log n'`` on new
    data); ``localization`` to the original γ. Constraints are not carried over.
    """
    return post.refined(
        include=include, exclude=exclude, data=data, nbeta=nbeta, localization=localization
    )


def refined_llc(
    post,
    *,
    include=None,
    exclude=None,
    data=None,
    nbeta=None,
    localization: float | None = None,
    method: str = "sgld",
    warn_user: bool = True,
    **sample_kw,
) -> LLC:
    """Weight- and/or data-refined LLC: ``refined_posterior(...).sample(method, ...).llc()``.

    See ``refined_posterior`` for the arguments; ``**sample_kw`` go to
    ``LocalPosterior.sample`` (``chains``, ``draws``, ``step_size``, ``batch_size``, ...).
    With a dataset on which ``w*`` is not a minimum, λ̂ follows docs/theory.md §4.2's gap formula
    and may be negative (then a warning explains it).
    """
    rp = refined_posterior(
        post,
        include=include,
        exclude=exclude,
        data=data,
        nbeta=nbeta,
        localization=localization,
    )
    return rp.sample(method, **sample_kw).llc(warn_user=warn_user)


@dataclass(frozen=True)
class WBIC:
    """``WBIC = E^{β=1/log n}[n L_n(w)]`` under the global posterior (Watanabe 2013).

    Attributes
    ----------
    mean, stderr : float
        The estimate and its Monte Carlo standard error (``n·mcse`` of the per-draw loss).
    per_chain : numpy.ndarray
        Per-chain estimates.
    n : int
    prior_scale : float
        σ of the global prior ``N(0, σ² I)`` on the lifted weights.
    nbeta : float
        ``n/log n``.
    """

    mean: float
    stderr: float
    per_chain: np.ndarray
    n: int
    prior_scale: float
    nbeta: float
    method: str

    def __float__(self) -> float:
        return float(self.mean)

    def __str__(self) -> str:
        return (
            f"WBIC = {self.mean:.6g} ± {self.stderr:.2g} (MC s.e.)  [n={self.n}, nβ = n/log n = "
            f"{self.nbeta:.4g}, prior N(0, {self.prior_scale:g}²I), {self.method}]"
        )


def wbic(post, *, prior_scale: float, method: str = "sgld", **sample_kw) -> WBIC:
    """WBIC with a proper global prior ``N(0, σ² I)`` on the lifted weights (docs/theory.md §3.1.5).

    Samples ``π(w) ∝ exp(−(n/log n) L_n(w) − ‖w‖²/(2σ²))`` with the SG-MCMC sampler
    ``method`` (chains start at ``w*``; the localizer is replaced by the global prior and
    ``nβ`` is fixed to ``n/log n`` whatever ``post.nbeta`` says), and returns
    ``n·E[L_n(w)]`` with the run's loss estimator. Watanabe (2013): WBIC has the same
    asymptotic expansion as the Bayes free energy, ``nL_n(w₀) + λ log n + O_p(√log n)``.
    Frozen parameters are constants (a WBIC of the lifted part, conditional on them).
    ``**sample_kw`` go to ``run_sgmcmc`` (``chains``, ``draws``, ``step_size``, ...).
    """
    import math

    import torch

    from .infer.sgmcmc import METHODS, run_sgmcmc
    from .potential import Potential

    if post.constraints:
        raise ValueError(
            "wbic: the posterior has constraints; WBIC is defined for the plain global "
            "posterior. Build the LocalPosterior without preserve(...) for WBIC."
        )
    if method not in METHODS:
        raise ValueError(f"wbic supports the SG-MCMC methods {list(METHODS)}; got {method!r}")
    try:
        sigma = float(prior_scale)
    except (TypeError, ValueError):
        raise TypeError(f"prior_scale must be a positive number; got {prior_scale!r}") from None
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"prior_scale must be a positive finite number (σ); got {prior_scale!r}")
    n = post.n
    nb = n / math.log(n)
    # the global posterior: N(0, σ²) prior, inverse temperature β = 1/log n
    pot = Potential(
        post, nbeta=nb, localization=1.0 / sigma**2, anchor=torch.zeros_like(post.center)
    )
    ref = run_sgmcmc(post, method=method, potential=pot, **sample_kw)  # a SampleResult
    from .diagnostics import mcse_mean

    L = np.asarray(ref.stats["loss"], dtype=np.float64)
    try:
        se = float(n * mcse_mean(L))
    except ValueError:
        se = float("nan")
    return WBIC(
        mean=float(n * L.mean()),
        stderr=se,
        per_chain=n * L.mean(axis=1),
        n=n,
        prior_scale=sigma,
        nbeta=nb,
        method=method,
    )
