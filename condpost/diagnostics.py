"""Convergence and Monte Carlo error diagnostics for MCMC draws.

All functions take draws laid out as ``[chains, draws]`` for a scalar quantity, or
``[chains, draws, *event]`` for an array-valued one, in which case the result has
shape ``event`` (a scalar quantity gives a NumPy float).  Only NumPy and the
standard library are used.

The estimators follow

* A. Vehtari, A. Gelman, D. Simpson, B. Carpenter and P.-C. Bürkner (2021),
  "Rank-normalization, folding, and localization: An improved R-hat for assessing
  convergence of MCMC", *Bayesian Analysis* 16(2), 667-718, doi:10.1214/20-BA1221
  (split chains, rank normalisation, folding, bulk and tail effective sample size);
* C. J. Geyer (1992), "Practical Markov chain Monte Carlo", *Statistical Science*
  7(4), 473-483 (initial positive and initial monotone sequence estimators of the
  integrated autocorrelation time).

The conventions (which draw is dropped for odd chain lengths, the normalisation of
the autocovariances, the truncation rule of the autocorrelation sum and the cap on the
effective sample size) are those of the reference implementation described in the
paper (Stan), so results agree with other implementations of the same paper, e.g.
ArviZ's ``rhat(method="rank")`` and ``ess(method="bulk"/"tail"/"mean")``.

Degenerate input
----------------
When every (split) chain is constant (tested by exact equality) the within-chain
variance ``W`` is zero and neither R-hat nor the effective sample size is defined:

* if all draws are identical, R-hat is ``nan`` (one could argue for 1, but there is
  nothing to diagnose; ``nan`` compares ``False`` with every threshold, so a check
  such as ``rhat < 1.01`` fails rather than passing silently);
* if the chains are stuck at *different* values, R-hat is ``inf`` (the limit
  ``B / W -> inf``), the clearest possible non-convergence signal;
* the effective sample sizes and ``mcse_mean`` are ``nan`` in both cases.

No ``RuntimeWarning`` is emitted for such input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "split_rhat",
    "ess_bulk",
    "ess_tail",
    "ess_basic",
    "mcse_mean",
    "MeanError",
    "mcse_mean_robust",
    "Trend",
    "trend",
    "VirialCheck",
    "virial_ratio",
]

_MIN_DRAWS = 4


# ---------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------


def _as_draws(x: ArrayLike, name: str = "x") -> NDArray[np.float64]:
    """Validate draws and return them as a float64 array of shape ``[chains, draws, K]``.

    The event dimensions are flattened into the last axis ``K``; use
    ``_event_shape`` to restore them.
    """
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be a real numeric array of shape [chains, draws, *event]; "
            f"could not convert it to float64 ({err})"
        ) from err
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have shape [chains, draws] or [chains, draws, *event] "
            f"(ndim >= 2), got ndim={arr.ndim} with shape {arr.shape}; for a single "
            f"chain pass x[None, :]"
        )
    n_chains, n_draws = arr.shape[:2]
    if n_chains < 1:
        raise ValueError(f"{name} must contain at least 1 chain, got shape {arr.shape}")
    if n_draws < _MIN_DRAWS:
        raise ValueError(
            f"{name} must contain at least {_MIN_DRAWS} draws per chain, got {n_draws} "
            f"(shape {arr.shape}); axis 1 must be the draw axis"
        )
    finite = np.isfinite(arr)
    if not finite.all():
        bad = np.argwhere(~finite)
        first = tuple(int(i) for i in bad[0])
        where = f"chain {first[0]} draw {first[1]}"
        if len(first) > 2:
            where += f" event index {first[2:]}"
        raise ValueError(
            f"{name} contains NaN/inf at {where} (value {float(arr[first])}; "
            f"{len(bad)} non-finite entries in total); diagnostics need finite draws"
        )
    return arr.reshape(n_chains, n_draws, -1)


def _event_shape(x: ArrayLike) -> tuple[int, ...]:
    return tuple(np.shape(x)[2:])


def _finish(values: NDArray[np.float64], event: tuple[int, ...]) -> float | NDArray[np.float64]:
    """Reshape a ``[K]`` result to the event shape (a NumPy float for scalars)."""
    out = np.asarray(values, dtype=np.float64).reshape(event)
    return out[()] if out.ndim == 0 else out


# ---------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------


def _split_chains(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Split every chain into its first and second half.

    ``[M, N, K] -> [2M, N // 2, K]``.  For odd ``N`` the middle draw is dropped, so both
    halves have equal length (Vehtari et al. 2021, Sec. 4.1).
    """
    half = a.shape[1] // 2
    return np.concatenate([a[:, :half], a[:, a.shape[1] - half :]], axis=0)


def _average_ranks(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Ranks (1-based) of the pooled draws of each column, ties sharing their mean rank.

    ``a`` has shape ``[S, K]``; ranks are computed independently for every column.
    """
    n = a.shape[0]
    order = np.argsort(a, axis=0, kind="stable")
    srt = np.take_along_axis(a, order, axis=0)
    pos = np.broadcast_to(np.arange(n)[:, None], srt.shape)
    new_group = np.ones(srt.shape, dtype=bool)
    new_group[1:] = srt[1:] != srt[:-1]
    end_group = np.ones(srt.shape, dtype=bool)
    end_group[:-1] = new_group[1:]
    # first and last sorted position of the tie group each position belongs to
    start = np.maximum.accumulate(np.where(new_group, pos, 0), axis=0)
    stop = np.minimum.accumulate(np.where(end_group, pos, n - 1)[::-1], axis=0)[::-1]
    ranks_sorted = 0.5 * (start + stop) + 1.0
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, axis=0)
    return ranks


def _normal_scores(n: int) -> NDArray[np.float64]:
    """Blom normal scores for every possible average rank ``r`` in ``{1, 1.5, ..., n}``.

    Entry ``2 r - 2`` holds ``Phi^{-1}((r - 3/8) / (n + 1/4))``.
    """
    inv_cdf = NormalDist().inv_cdf
    denom = n + 0.25
    return np.array([inv_cdf((0.5 * k - 0.375) / denom) for k in range(2, 2 * n + 1)])


def _rank_normalize(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rank-normalise draws of shape ``[M, N, K]`` (pooled over chains and draws).

    ``z = Phi^{-1}((r - 3/8) / (S + 1/4))`` with ``r`` the average rank among all
    ``S = M N`` draws (Vehtari et al. 2021, Eq. 14, Blom's offset).
    """
    m, n, k = a.shape
    s = m * n
    ranks = _average_ranks(a.reshape(s, k))
    idx = np.rint(2.0 * ranks - 2.0).astype(np.intp)
    return _normal_scores(s)[idx].reshape(m, n, k)


def _rhat_classic(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Potential scale reduction of ``[M, N, K]`` chains (Gelman-Rubin, Vehtari Eq. 3-4).

    ``sqrt(var_plus / W)`` with ``var_plus = (N - 1) / N * W + B / N``.  Where every
    chain is constant (``W == 0``) the result is ``nan`` if all draws are equal and
    ``inf`` if the chains sit at different values.
    """
    m, n, _ = a.shape
    chain_mean = a.mean(axis=1)
    within = a.var(axis=1, ddof=1).mean(axis=0)
    between_over_n = chain_mean.var(axis=0, ddof=1)  # = B / N
    var_plus = (n - 1) / n * within + between_over_n
    stuck = _all_chains_constant(a)
    ok = ~stuck & (within > 0)
    out = np.full(within.shape, np.nan)
    out[ok] = np.sqrt(var_plus[ok] / within[ok])
    # every chain constant but not all at the same value: W = 0 < B, R-hat = inf
    out[stuck & (a != a[:1, :1]).any(axis=(0, 1))] = np.inf
    return out


def _all_chains_constant(a: NDArray[np.float64]) -> NDArray[np.bool_]:
    """``[K]`` mask: every chain of ``[M, N, K]`` draws is exactly constant (``W == 0``).

    Tested by exact equality, so rounding in the variance cannot turn a stuck sampler
    into a tiny positive within-chain variance.
    """
    return (a == a[:, :1]).all(axis=(0, 1))


def _autocovariance(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Biased autocovariance ``(1/N) sum_t (x_t - xbar)(x_{t+k} - xbar)`` along axis 1, by FFT."""
    n = a.shape[1]
    centred = a - a.mean(axis=1, keepdims=True)
    nfft = 1 << (2 * n - 1).bit_length()  # zero padding >= 2N - 1 avoids wrap-around
    f = np.fft.rfft(centred, n=nfft, axis=1)
    acov = np.fft.irfft(f.real**2 + f.imag**2, n=nfft, axis=1)[:, :n]
    return acov / n


def _ess(a: NDArray[np.float64]) -> NDArray[np.float64]:
    """Effective sample size of already split chains ``[M, N, K]``.

    Multi-chain autocorrelation (Vehtari et al. 2021, Eq. 10, in the form used by the
    Stan reference implementation, with the biased per-chain autocovariances)::

        rho_t = 1 - (W - mean_m acov_m(t)) / var_plus,   rho_0 = 1,

    and the integrated autocorrelation time from Geyer's (1992) initial positive
    sequence of pair sums ``P_k = rho_{2k} + rho_{2k+1}``, truncated before the first
    ``k`` with ``P_k <= 0`` (or at the last pair the lags allow), made monotone
    (``P_k <- min(P_0, ..., P_k)``), plus the next even-lag autocorrelation when it is
    positive (Vehtari et al. 2021, Sec. 3.2)::

        tau = -1 + 2 sum_{k < K} P_k + max(rho_{2K}, 0).

    ``tau`` is bounded below by ``1 / log10(M N)``, i.e. the ESS is capped at
    ``M N log10(M N)``.  ``nan`` where every chain is constant (``W == 0``).
    """
    m, n, _ = a.shape
    acov = _autocovariance(a)  # [M, N, K]
    within = acov[:, 0].mean(axis=0) * n / (n - 1)  # mean of unbiased chain variances
    var_plus = within * (n - 1) / n + a.mean(axis=1).var(axis=0, ddof=1)
    ok = ~_all_chains_constant(a) & (within > 0)
    out = np.full(within.shape, np.nan)
    if not ok.any():
        return out
    acov, within, var_plus = acov[..., ok], within[ok], var_plus[ok]

    rho = 1.0 - (within - acov.mean(axis=0)) / var_plus  # [N, K']
    rho[0] = 1.0
    k_max = max((n - 3) // 2, 0)  # last pair index (2k, 2k+1) with 2k + 1 <= N - 2
    n_pairs = k_max + 1
    pairs = rho[0 : 2 * n_pairs : 2] + rho[1 : 2 * n_pairs : 2]  # [n_pairs, K']
    nonpos = pairs <= 0
    # K: first pair index with a non-positive sum, else the last available pair
    cut = np.where(nonpos.any(axis=0), nonpos.argmax(axis=0), k_max)
    cut = np.minimum(cut, k_max)
    monotone = np.minimum.accumulate(pairs, axis=0)
    keep = np.arange(n_pairs)[:, None] < cut[None, :]
    tail_even = np.take_along_axis(rho, (2 * cut)[None, :], axis=0)[0]
    tau = -1.0 + 2.0 * np.where(keep, monotone, 0.0).sum(axis=0) + np.maximum(tail_even, 0.0)
    total = m * n
    tau = np.maximum(tau, 1.0 / math.log10(total))
    out[ok] = total / tau
    return out


# ---------------------------------------------------------------------------------------
# Public diagnostics
# ---------------------------------------------------------------------------------------


def split_rhat(x: ArrayLike) -> float | NDArray[np.float64]:
    """Rank-normalised split R-hat (Vehtari et al. 2021).

    Every chain is split into two halves (the middle draw is dropped for an odd number
    of draws, so a single chain also works), and R-hat is computed twice:

    * *bulk*: the classic potential scale reduction ``sqrt(var_plus / W)`` of the
      rank-normalised split chains (detects differences in location);
    * *folded*: the same for the rank-normalised folded draws ``|x - median(x)|``,
      the median taken over all split draws (detects differences in scale).

    The result is the maximum of the two (Vehtari et al. 2021, Sec. 4.2, Eq. 16).

    Parameters
    ----------
    x : array_like
        Draws of shape ``[chains, draws]`` or ``[chains, draws, *event]``; at least 4
        draws, all finite.

    Returns
    -------
    numpy.float64 or numpy.ndarray
        R-hat, of shape ``event``.  Values close to 1 (commonly ``< 1.01``) indicate
        that the chains mix.  ``nan`` where all draws are identical, ``inf`` where every
        split chain is constant but not all at the same value.  Where only the folded
        draws are constant (e.g. draws taking two values symmetric about the median)
        the folded R-hat is undefined and the bulk value is returned.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions, fewer than 4 draws, or non-finite values.

    References
    ----------
    A. Vehtari, A. Gelman, D. Simpson, B. Carpenter, P.-C. Bürkner (2021).
    Rank-normalization, folding, and localization: An improved R-hat for assessing
    convergence of MCMC. Bayesian Analysis 16(2), 667-718.
    """
    a = _as_draws(x)
    split = _split_chains(a)
    bulk = _rhat_classic(_rank_normalize(split))
    med = np.median(split.reshape(-1, split.shape[2]), axis=0)
    folded = _rhat_classic(_rank_normalize(np.abs(split - med)))
    return _finish(np.fmax(bulk, folded), _event_shape(x))


def ess_bulk(x: ArrayLike) -> float | NDArray[np.float64]:
    """Bulk effective sample size (Vehtari et al. 2021, Sec. 4.3).

    The ESS of the rank-normalised split chains, i.e. the ESS of the normal scores of
    the pooled ranks.  It is a measure of the sampling efficiency in the bulk of the
    distribution (for the mean and median, say) that is well defined also for
    heavy-tailed draws.

    Parameters
    ----------
    x : array_like
        Draws of shape ``[chains, draws]`` or ``[chains, draws, *event]``.

    Returns
    -------
    numpy.float64 or numpy.ndarray
        Effective sample size of shape ``event``; at most
        ``S log10(S)`` with ``S`` the number of split draws used.  ``nan`` for constant
        chains.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions, fewer than 4 draws, or non-finite values.

    Notes
    -----
    The autocorrelation sum uses Geyer's (1992) initial positive and initial monotone
    sequence estimators; autocovariances are computed by FFT.

    References
    ----------
    A. Vehtari et al. (2021), Bayesian Analysis 16(2), 667-718.
    C. J. Geyer (1992), Practical Markov chain Monte Carlo, Statistical Science 7(4).
    """
    a = _as_draws(x)
    return _finish(_ess(_rank_normalize(_split_chains(a))), _event_shape(x))


def ess_tail(x: ArrayLike, prob: tuple[float, float] = (0.05, 0.95)) -> float | NDArray[np.float64]:
    """Tail effective sample size (Vehtari et al. 2021, Sec. 4.3).

    The minimum of the split-chain ESS of the indicators ``I(x <= q_low)`` and
    ``I(x <= q_high)``, where ``q_low``, ``q_high`` are the ``prob`` quantiles of all
    draws (linearly interpolated sample quantiles).  It measures how well the
    ``5%`` and ``95%`` quantiles, and hence central intervals, are estimated.

    Parameters
    ----------
    x : array_like
        Draws of shape ``[chains, draws]`` or ``[chains, draws, *event]``.
    prob : tuple of float, default (0.05, 0.95)
        The two tail probabilities, each in ``(0, 1)``.

    Returns
    -------
    numpy.float64 or numpy.ndarray
        Tail ESS of shape ``event``.  If one indicator is constant (a point mass at
        the extreme of the draws) its ESS is undefined and the other one is returned;
        ``nan`` if both are.

    Raises
    ------
    ValueError
        For invalid draws (see ``ess_bulk``) or probabilities outside ``(0, 1)``.

    References
    ----------
    A. Vehtari et al. (2021), Bayesian Analysis 16(2), 667-718.
    """
    try:
        p_low, p_high = (float(p) for p in prob)
    except (TypeError, ValueError) as err:
        raise ValueError(f"prob must be a pair of floats, got {prob!r}") from err
    if not (0.0 < p_low < 1.0 and 0.0 < p_high < 1.0):
        raise ValueError(f"prob must lie strictly between 0 and 1, got {prob!r}")
    a = _as_draws(x)
    q = np.quantile(a.reshape(-1, a.shape[2]), [p_low, p_high], axis=0)  # [2, K]
    ess_low = _ess(_split_chains((a <= q[0]).astype(np.float64)))
    ess_high = _ess(_split_chains((a <= q[1]).astype(np.float64)))
    return _finish(np.fmin(ess_low, ess_high), _event_shape(x))


def ess_basic(x: ArrayLike) -> float | NDArray[np.float64]:
    """Split-chain effective sample size of the raw draws (no rank normalisation).

    This is the ESS relevant to the Monte Carlo standard error of the *mean* of ``x``
    (Vehtari et al. 2021, Sec. 3.2, applied to split chains); it assumes a finite
    variance.  Used by ``mcse_mean``.

    Parameters
    ----------
    x : array_like
        Draws of shape ``[chains, draws]`` or ``[chains, draws, *event]``.

    Returns
    -------
    numpy.float64 or numpy.ndarray
        ESS of shape ``event``; ``nan`` for constant chains.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions, fewer than 4 draws, or non-finite values.

    References
    ----------
    A. Vehtari et al. (2021), Bayesian Analysis 16(2), 667-718.
    C. J. Geyer (1992), Practical Markov chain Monte Carlo, Statistical Science 7(4).
    """
    a = _as_draws(x)
    return _finish(_ess(_split_chains(a)), _event_shape(x))


def mcse_mean(x: ArrayLike) -> float | NDArray[np.float64]:
    """Monte Carlo standard error of the posterior mean, ``sd(x) / sqrt(ess_basic(x))``.

    ``sd`` is the sample standard deviation (``ddof=1``) of all draws pooled.

    Parameters
    ----------
    x : array_like
        Draws of shape ``[chains, draws]`` or ``[chains, draws, *event]``.

    Returns
    -------
    numpy.float64 or numpy.ndarray
        Standard error of shape ``event``; ``nan`` for constant chains.

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions, fewer than 4 draws, or non-finite values.
    """
    a = _as_draws(x)
    sd = a.reshape(-1, a.shape[2]).std(axis=0, ddof=1)
    return _finish(sd / np.sqrt(_ess(_split_chains(a))), _event_shape(x))


def _t_factor(dof: int, level: float = 0.95) -> float:
    """``t_{dof}((1+level)/2) / z((1+level)/2)``: widens a standard error estimated with
    ``dof`` degrees of freedom so that ``±z·se`` keeps its nominal coverage."""
    if dof < 1:
        return float("nan")
    from scipy.stats import t as student_t

    q = 0.5 * (1.0 + level)
    return float(student_t.ppf(q, dof) / NormalDist().inv_cdf(q))


def _n_batches(draws: int, batches: int | None) -> int:
    if batches is not None:
        if isinstance(batches, bool) or int(batches) != batches or batches < 2:
            raise ValueError(f"batches must be an integer ≥ 2; got {batches!r}")
        return int(min(batches, draws))
    # about √S batches, between 5 and 20 (fewer when the chains are very short)
    return int(min(20, max(2, min(draws // 4, max(5, int(math.sqrt(draws)))))))


@dataclass(frozen=True)
class MeanError:
    """Result of ``mcse_mean_robust``: three estimates of the MC error of a mean.

    Attributes
    ----------
    stderr : float
        The reported error: the largest of ``ess``, ``batch_means`` and ``chain_means``
        (each finite one), so that none of the three ways the error can show is hidden.
    ess : float
        ``sd/√ESS`` with the multi-chain split-chain ESS (``mcse_mean``).
    batch_means : float
        From ``B`` consecutive time batches of the chain-averaged trace:
        ``sd(batch means)/√B``. A drift common to
        all chains (a start that is not yet stationary) spreads the batch means, so it
        shows here even when every chain agrees with the others.
    chain_means : float
        ``sd(chain means)/√C`` (NaN with one chain). It is the between-chain spread itself, with no model of the
        autocorrelation, so slow modes that the ESS's autocorrelation sum truncates away
        still show.
    batches, chains : int
        ``B`` and ``C``.
    source : str
        Which of the three is ``stderr``.
    """

    stderr: float
    ess: float
    batch_means: float
    chain_means: float
    batches: int
    chains: int
    source: str

    def __float__(self) -> float:
        return float(self.stderr)

    def interval_halfwidth(self, level: float = 0.95) -> float:
        """Half-width of a ``level`` interval: ``t_ν·stderr`` with ``ν`` the degrees of
        freedom of the estimate that gave ``stderr`` (``C − 1`` for chain means, ``B − 1``
        for batch means; normal for the ESS-based one)."""
        q = NormalDist().inv_cdf(0.5 * (1.0 + level))
        dof = {"chain_means": self.chains - 1, "batch_means": self.batches - 1}.get(self.source)
        f = _t_factor(dof, level) if dof else 1.0
        return float(q * f * self.stderr)


def mcse_mean_robust(x: ArrayLike, *, batches: int | None = None) -> MeanError:
    """Monte Carlo standard error of the mean of ``[chains, draws]`` draws that does not
    understate the spread between runs.

    The ESS-based ``mcse_mean`` assumes stationary chains and an autocorrelation sum that
    captures every slow mode; with few chains started at the same point and a slow drift
    it can be several times too small (two seeds of one LLC run then disagree by many
    "standard errors"). This returns the largest of

    * the ESS-based error (``mcse_mean``);
    * the batch-means error of the chain-averaged trace, ``B`` time batches (default about
      √draws, between 5 and 20);
    * the chain-means error, ``sd(chain means)/√C``.

    Each of the three is a consistent estimate of the same error for stationary chains,
    so the maximum is at most a little larger than the truth (about 1.2× for 4–8 chains
    of well-mixed draws); where they disagree, the larger one is the one that saw a slow
    mode or a drift. For an interval with few chains widen it by Student's
    ``t_{C−1}``: ``MeanError.interval_halfwidth()``.

    Parameters
    ----------
    x : array_like
        Draws of shape ``[chains, draws]``.
    batches : int, optional
        Number of time batches ``B`` (≥ 2).

    Returns
    -------
    MeanError
        ``float(result)`` is the reported standard error.
    """
    if np.ndim(x) != 2:
        raise ValueError(f"x must have shape [chains, draws]; got shape {np.shape(x)}")
    a = _as_draws(x)[..., 0]
    C, S = a.shape
    try:
        se_ess = float(mcse_mean(a))
    except ValueError:  # pragma: no cover - _as_draws already checked
        se_ess = float("nan")
    B = _n_batches(S, batches)
    trace = a.mean(axis=0)
    size = S // B
    # the last B·size draws, so that the most recent (most stationary) ones are all used
    bm = trace[S - B * size :].reshape(B, size).mean(axis=1)
    se_bm = float(bm.std(ddof=1) / math.sqrt(B)) if B >= 2 else float("nan")
    if C >= 2:
        se_cm = float(a.mean(axis=1).std(ddof=1) / math.sqrt(C))
    else:
        se_cm = float("nan")
    cands = {"ess": se_ess, "batch_means": se_bm, "chain_means": se_cm}
    finite = {k: v for k, v in cands.items() if np.isfinite(v)}
    if finite:
        source = max(finite, key=finite.get)
        se = finite[source]
    else:
        source, se = "none", float("nan")
    return MeanError(
        stderr=float(se),
        ess=se_ess,
        batch_means=se_bm,
        chain_means=se_cm,
        batches=B,
        chains=C,
        source=source,
    )


@dataclass(frozen=True)
class Trend:
    """Result of ``trend``: the linear drift of a trace over its window.

    Attributes
    ----------
    change : float
        Fitted change of the chain-averaged trace from the first to the last draw of the
        window (slope × window length).
    stderr : float
        Its standard error, from the residuals of the ``B`` batch means (``t_{B−2}``-widened).
    mean : float
        Mean of the window.
    batches : int
    """

    change: float
    stderr: float
    mean: float
    batches: int

    def flat(self, *, rel: float = 0.0, abs_tol: float = 0.0, z: float = 2.0) -> bool:
        """No trend: the change is within ``z`` standard errors, or within
        ``max(rel·|mean|, abs_tol)``."""
        if not np.isfinite(self.change):
            return False
        tol = max(rel * abs(self.mean), abs_tol)
        return bool(abs(self.change) <= tol or abs(self.change) <= z * self.stderr)


def trend(x: ArrayLike, *, batches: int | None = None) -> Trend:
    """Linear trend of the chain-averaged trace of ``[chains, draws]`` draws.

    A line is fitted to ``B`` time-batch means of the chain-averaged trace (default about
    √draws, between 5 and 20); batching makes the residuals nearly independent, so the
    slope's standard error is honest for autocorrelated chains. Used for the plateau
    criterion of ``condpost.auto`` (‖w − w*‖² and the loss no longer trending).
    """
    if np.ndim(x) != 2:
        raise ValueError(f"x must have shape [chains, draws]; got shape {np.shape(x)}")
    a = _as_draws(x)[..., 0]
    S = a.shape[1]
    B = max(_n_batches(S, batches), 3) if S >= 3 else S
    size = S // B
    trace = a.mean(axis=0)[S - B * size :].reshape(B, size).mean(axis=1)
    t = (np.arange(B) + 0.5) * size
    tc = t - t.mean()
    slope = float((tc * (trace - trace.mean())).sum() / (tc * tc).sum())
    resid = trace - trace.mean() - slope * tc
    dof = B - 2
    if dof >= 1:
        s2 = float((resid**2).sum() / dof)
        se = math.sqrt(s2 / float((tc * tc).sum())) * _t_factor(dof)
    else:
        se = float("nan")
    span = float(B * size)
    return Trend(change=slope * span, stderr=se * span, mean=float(a.mean()), batches=B)


@dataclass(frozen=True)
class VirialCheck:
    """Result of ``virial_ratio``.

    Attributes
    ----------
    ratio : float
        ``mean(v) / d``; should be 1 within a few ``stderr`` for a correct sampler.
    stderr : float
        Monte Carlo standard error of ``ratio``, ``mcse_mean(v) / d``.
    d : int
        Dimension of the parameter space.
    """

    ratio: float
    stderr: float
    d: int


def virial_ratio(displacement_dot_grad: ArrayLike, d: int) -> VirialCheck:
    """Virial (equipartition) check ``E[(w - w*) . grad U(w)] / d``.

    For a target density ``p(w) ∝ exp(-U(w))`` on ``R^d`` whose tails decay fast enough,
    integration by parts gives ``E[(w - w*) . grad U(w)] = d`` exactly, for any fixed
    point ``w*``.  The ratio of the sample mean of ``v = (w - w*) . grad U(w)`` to ``d``
    must therefore be 1 up to Monte Carlo error; a clear deviation means the draws do
    not follow ``exp(-U)`` (wrong temperature, bias of a discretised sampler, or
    non-convergence).

    Parameters
    ----------
    displacement_dot_grad : array_like
        Per-draw values ``v`` of shape ``[chains, draws]``.
    d : int
        Dimension of ``w``; a positive integer.

    Returns
    -------
    VirialCheck
        ``ratio = mean(v) / d`` and ``stderr = mcse_mean(v) / d`` (``nan`` if ``v`` is
        constant).

    Raises
    ------
    ValueError
        If ``d`` is not a positive integer, or ``v`` is not a valid ``[chains, draws]``
        array (see ``mcse_mean``).
    """
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"d must be a positive integer (the dimension of w), got {d!r}")
    a = _as_draws(displacement_dot_grad, name="displacement_dot_grad")
    if np.ndim(displacement_dot_grad) != 2:
        raise ValueError(
            "displacement_dot_grad must have shape [chains, draws], got shape "
            f"{np.shape(displacement_dot_grad)}"
        )
    d = int(d)
    return VirialCheck(ratio=float(a.mean()) / d, stderr=float(mcse_mean(a[..., 0])) / d, d=d)
