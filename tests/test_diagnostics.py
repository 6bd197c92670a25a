"""Tests of condpost.diagnostics against known ground truth.

Reference values come from theory wherever possible: the integrated autocorrelation
time of Gaussian AR(1) chains (and of their quantile indicators), the large-sample
limit of R-hat for chains drawn from known, different distributions, and the
chi-square moments behind the virial check.  The remaining tests compare with ArviZ,
an independent implementation of the same paper.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from statistics import NormalDist

import numpy as np
import pytest

from condpost.diagnostics import (
    VirialCheck,
    ess_basic,
    ess_bulk,
    ess_tail,
    mcse_mean,
    split_rhat,
    virial_ratio,
)

_ND = NormalDist()


def ar1(phi: float, chains: int, draws: int, seed: int) -> np.ndarray:
    """Stationary AR(1) chains x_t = phi x_{t-1} + sqrt(1 - phi^2) eps_t, unit variance."""
    eps = np.random.default_rng(seed).standard_normal((draws, chains))
    x = np.empty_like(eps)
    x[0] = eps[0]
    c = math.sqrt(1.0 - phi**2)
    for t in range(1, draws):
        x[t] = phi * x[t - 1] + c * eps[t]
    return x.T.copy()


def ar1_indicator_tau(phi: float, p: float) -> float:
    """Integrated autocorrelation time of I(x_t <= q_p) for the AR(1) chain above.

    The lag-t autocovariance of the indicator is Phi2(q, q; r) - p^2 with r = phi^t,
    which by Plackett's identity (d Phi2 / d r = bivariate normal density) equals
    int_0^r exp(-q^2 / (1 + s)) / (2 pi sqrt(1 - s^2)) ds.
    """
    q = _ND.inv_cdf(p)
    nodes, weights = np.polynomial.legendre.leggauss(64)
    tau = 1.0
    r = phi
    while abs(r) > 1e-12:
        s = 0.5 * r * (nodes + 1.0)
        cov = 0.5 * r * weights @ (np.exp(-q * q / (1.0 + s)) / (2 * np.pi * np.sqrt(1 - s * s)))
        tau += 2.0 * cov / (p * (1.0 - p))
        r *= phi
    return tau


# Relative tolerances for ESS estimates of 4 x 4000 AR(1) draws.  They were set from an
# empirical study of the estimators' sampling spread (200 independent replications
# each): relative sd of ess_bulk / ess_basic was 2.5% (phi=0), 3.8% (0.5), 8.7% (0.9)
# and 5.1% (phi=-0.5); of ess_tail 2.1%, 4.3%, 9.6%, with a small downward bias (mean
# ratio 0.98, 0.97, 0.95) because it is the minimum of two noisy estimates.  The
# tolerances are about 3-4 sd, so they test the estimator, not the lucky seed.
ESS_CASES = [(0.0, 0.10), (0.5, 0.15), (0.9, 0.25), (-0.5, 0.20)]
TAIL_CASES = [(0.0, 0.10), (0.5, 0.15), (0.9, 0.30)]
CHAINS, DRAWS = 4, 4000


@pytest.mark.parametrize("phi,rtol", ESS_CASES)
def test_ess_bulk_and_basic_match_ar1_theory(phi: float, rtol: float) -> None:
    x = ar1(phi, CHAINS, DRAWS, seed=11)
    truth = CHAINS * DRAWS * (1 - phi) / (1 + phi)
    assert ess_basic(x) == pytest.approx(truth, rel=rtol)
    assert ess_bulk(x) == pytest.approx(truth, rel=rtol)


@pytest.mark.parametrize("phi,rtol", TAIL_CASES)
def test_ess_tail_matches_ar1_indicator_theory(phi: float, rtol: float) -> None:
    x = ar1(phi, CHAINS, DRAWS, seed=12)
    # I(x <= q95) = 1 - I(x > q95) has, by symmetry, the same autocorrelation as I(x <= q05)
    truth = CHAINS * DRAWS / ar1_indicator_tau(phi, 0.05)
    assert ess_tail(x) == pytest.approx(truth, rel=rtol)


def test_ess_is_capped_at_s_log10_s() -> None:
    # phi = -0.9 has true ESS 19 S, above the cap S log10(S) of Vehtari et al. (2021)
    x = ar1(-0.9, CHAINS, DRAWS, seed=13)
    s = CHAINS * DRAWS
    cap = s * math.log10(s)
    assert ess_basic(x) == pytest.approx(cap, rel=1e-12)
    assert ess_bulk(x) == pytest.approx(cap, rel=1e-12)


def test_mcse_mean_matches_ar1_theory() -> None:
    phi = 0.5
    x = ar1(phi, CHAINS, DRAWS, seed=14)
    # Var(x) = 1, so the true MCSE of the mean is 1 / sqrt(true ESS)
    truth = math.sqrt((1 + phi) / ((1 - phi) * CHAINS * DRAWS))
    assert mcse_mean(x) == pytest.approx(truth, rel=0.10)


def test_single_chain_is_split() -> None:
    x = ar1(0.5, 1, 4 * DRAWS, seed=15)
    assert ess_basic(x) == pytest.approx(4 * DRAWS / 3, rel=0.15)
    assert split_rhat(x) < 1.01
    drift = x + np.linspace(0.0, 1.5, x.shape[1])
    assert split_rhat(drift) > 1.05


# ---------------------------------------------------------------------------------------
# R-hat
# ---------------------------------------------------------------------------------------


def _rhat_limit(samples: list[tuple[int, np.ndarray]], cdf) -> float:
    """Large-sample limit of rank-normalised R-hat for split chains of known laws.

    ``samples`` lists (number of split chains, fine quantile grid of their law) and
    ``cdf`` is the pooled CDF, so Phi^-1(cdf(x)) is the limit of the rank normal score.
    As N -> inf, R-hat^2 -> (W + B/N) / W with W the mean within-chain variance and B/N
    the (ddof=1) variance of the chain means of the normal scores.
    """
    counts, means, variances = [], [], []
    for count, grid in samples:
        z = np.array([_ND.inv_cdf(p) for p in cdf(grid)])
        counts.append(count)
        means.append(z.mean())
        variances.append(z.var())
    c, mu, var = np.array(counts), np.array(means), np.array(variances)
    within = c @ var / c.sum()
    between = c @ (mu - c @ mu / c.sum()) ** 2 / (c.sum() - 1)
    return math.sqrt((within + between) / within)


_U = (np.arange(20000) + 0.5) / 20000  # midpoint quantile grid
_NORMAL_Q = np.array([_ND.inv_cdf(u) for u in _U])
_HALF_NORMAL_Q = np.array([_ND.inv_cdf((1 + u) / 2) for u in _U])
_PHI = np.vectorize(_ND.cdf)


def _classic_split_rhat(x: np.ndarray) -> float:
    """Gelman-Rubin split R-hat on the raw draws (no ranks, no folding)."""
    half = x.shape[1] // 2
    s = np.concatenate([x[:, :half], x[:, -half:]])
    n = s.shape[1]
    w = s.var(axis=1, ddof=1).mean()
    return math.sqrt(((n - 1) / n * w + s.mean(axis=1).var(ddof=1)) / w)


def test_rhat_iid_is_close_to_one() -> None:
    x = np.random.default_rng(20).standard_normal((4, 1000))
    assert 0.99 < split_rhat(x) < 1.01


# abs tolerance ~4 sd of the estimate (sd 0.0135 for 2 chains, 0.0072 for 4 chains,
# over 400 replications)
@pytest.mark.parametrize("chains,atol", [(2, 0.055), (4, 0.03)])
def test_rhat_detects_shifted_chain(chains: int, atol: float) -> None:
    x = np.random.default_rng(21).standard_normal((chains, 1000))
    x[0] += 1.0
    mix = 1.0 / chains
    limit = _rhat_limit(
        [(2 * (chains - 1), _NORMAL_Q), (2, _NORMAL_Q + 1.0)],
        lambda t: (1 - mix) * _PHI(t) + mix * _PHI(t - 1.0),
    )
    # limits: 1.154 (2 chains), 1.1007 (4 chains); with 4 chains "> 1.1" is only the
    # population value, so the sample is checked against the limit and a lower bound
    rhat = split_rhat(x)
    assert rhat == pytest.approx(limit, abs=atol)
    assert rhat > (1.1 if chains == 2 else 1.05)


def test_rhat_detects_scale_difference_via_folding() -> None:
    x = np.random.default_rng(22).standard_normal((4, 1000))
    x[0] *= 3.0
    # the chain means agree, so a location-only R-hat sees nothing ...
    assert _classic_split_rhat(x) < 1.01
    # ... but the folded draws |x - median| differ in location between chains
    limit = _rhat_limit(
        [(6, _HALF_NORMAL_Q), (2, 3.0 * _HALF_NORMAL_Q)],
        lambda t: 0.75 * (2 * _PHI(t) - 1) + 0.25 * (2 * _PHI(t / 3.0) - 1),
    )
    rhat = split_rhat(x)
    assert limit == pytest.approx(1.1455, abs=1e-3)
    assert rhat == pytest.approx(limit, abs=0.04)  # ~4 sd (sd 0.010 over 300 replications)
    assert rhat > 1.1


def test_rank_based_diagnostics_are_invariant_to_monotone_maps() -> None:
    x = ar1(0.7, 3, 500, seed=23)
    x[1] += 0.3
    for fn in (split_rhat, ess_bulk, ess_tail):
        assert fn(np.exp(x)) == pytest.approx(fn(x), rel=1e-12)
        assert fn(x**3) == pytest.approx(fn(x), rel=1e-12)


def test_average_ranks_match_brute_force_definition() -> None:
    from condpost.diagnostics import _average_ranks

    a = np.random.default_rng(24).integers(0, 6, size=(40, 3)).astype(float)
    # rank = (number strictly smaller) + (number equal + 1) / 2
    brute = (a[None, :, :] < a[:, None, :]).sum(1) + ((a[None] == a[:, None]).sum(1) + 1) / 2
    np.testing.assert_array_equal(_average_ranks(a), brute)


# ---------------------------------------------------------------------------------------
# Cross-check with ArviZ (independent implementation of Vehtari et al. 2021)
# ---------------------------------------------------------------------------------------


def _arviz():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("arviz")


def _random_case(kind: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    if kind == "normal":
        return rng.standard_normal((4, 200))
    if kind == "odd_draws_2_chains":
        return rng.standard_normal((2, 301))
    if kind == "heavy_tailed_offsets":
        return rng.standard_t(1.5, size=(3, 250)) + rng.normal(size=(3, 1))
    if kind == "autocorrelated":
        return ar1(0.95, 4, 400, seed=30) * np.array([[1.0], [1.0], [1.5], [1.0]])
    if kind == "short":
        return rng.standard_normal((2, 9))
    if kind == "discrete":
        # ties everywhere; both tail indicators non-degenerate (see next test)
        return rng.integers(0, 40, size=(4, 150)).astype(float)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["normal", "odd_draws_2_chains", "heavy_tailed_offsets", "autocorrelated", "short", "discrete"],
)
def test_agrees_with_arviz(kind: str) -> None:
    az = _arviz()
    x = _random_case(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {
            "rhat": az.rhat(x, method="rank"),
            "bulk": az.ess(x, method="bulk"),
            "tail": az.ess(x, method="tail"),
            "basic": az.ess(x, method="mean"),
            "mcse": az.mcse(x, method="mean"),
        }
    ours = {
        "rhat": split_rhat(x),
        "bulk": ess_bulk(x),
        "tail": ess_tail(x),
        "basic": ess_basic(x),
        "mcse": mcse_mean(x),
    }
    for key, value in ours.items():
        assert value == pytest.approx(float(ref[key]), rel=1e-6), key


def test_tail_ess_with_point_mass_at_extreme() -> None:
    # A legitimate difference from ArviZ: when >= 5% of the draws sit at the maximum,
    # I(x <= q95) is identically 1, its ESS is undefined, and we return the ESS of the
    # other indicator.  ArviZ instead counts the constant indicator as having ESS equal
    # to the number of draws and takes the minimum, so it can be smaller than ours.
    x = np.random.default_rng(31).integers(0, 5, size=(4, 300)).astype(float)
    low_only = ess_tail(x, prob=(0.05, 0.05))
    assert np.isfinite(low_only)
    assert ess_tail(x) == low_only
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = float(az.ess(x, method="tail"))
    assert ref == pytest.approx(min(low_only, x.size), rel=1e-9)


# ---------------------------------------------------------------------------------------
# Shapes and degenerate input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [split_rhat, ess_bulk, ess_tail, ess_basic, mcse_mean])
def test_event_dimensions_are_vectorised(fn) -> None:
    x = np.random.default_rng(40).standard_normal((3, 101, 2, 3))
    x[1, :, 0, 2] += 2.0
    out = fn(x)
    assert isinstance(out, np.ndarray) and out.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            scalar = fn(x[:, :, i, j])
            assert isinstance(scalar, float)
            assert out[i, j] == pytest.approx(scalar, rel=1e-12)


def test_accepts_array_like() -> None:
    x = np.random.default_rng(41).standard_normal((2, 20))
    assert split_rhat(x.tolist()) == split_rhat(x)
    assert ess_bulk(x.astype(np.float32)) == pytest.approx(ess_bulk(x), rel=1e-5)


def test_constant_chains_give_nan_without_warnings() -> None:
    same = np.full((3, 50), 2.5)
    stuck = np.repeat([[0.0], [1.0], [1.0]], 50, axis=1)
    mixed = np.random.default_rng(42).standard_normal((3, 50, 2))
    mixed[:, :, 1] = -1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(split_rhat(same))
        assert split_rhat(stuck) == np.inf  # stuck at different values: B > 0 = W
        for fn in (ess_bulk, ess_tail, ess_basic, mcse_mean):
            assert np.isnan(fn(same))
            assert np.isnan(fn(stuck))
        for fn in (split_rhat, ess_bulk, ess_tail, ess_basic, mcse_mean):
            out = fn(mixed)
            assert np.isfinite(out[0]) and np.isnan(out[1])


def test_minimum_number_of_draws() -> None:
    x = np.array([[0.3, -1.2, 0.8, 0.1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fn in (split_rhat, ess_bulk, ess_tail, ess_basic, mcse_mean):
            assert np.isfinite(fn(x))
    with pytest.raises(ValueError, match=r"at least 4 draws per chain, got 3"):
        ess_bulk(x[:, :3])


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [split_rhat, ess_bulk, ess_tail, ess_basic, mcse_mean])
def test_error_messages(fn) -> None:
    with pytest.raises(ValueError, match=r"ndim >= 2\), got ndim=1"):
        fn(np.zeros(10))
    with pytest.raises(ValueError, match=r"at least 4 draws per chain, got 2"):
        fn(np.zeros((3, 2)))
    x = np.random.default_rng(50).standard_normal((2, 10, 3))
    x[1, 3, 2] = np.nan
    x[1, 7, 0] = np.inf
    with pytest.raises(
        ValueError,
        match=r"x contains NaN/inf at chain 1 draw 3 event index \(2,\) .*2 non-finite",
    ):
        fn(x)
    with pytest.raises(ValueError, match=r"x contains NaN/inf at chain 0 draw 5 \(value -inf"):
        fn(np.where(np.arange(8) == 5, -np.inf, 0.0)[None, :])
    with pytest.raises(ValueError, match=r"real numeric array"):
        fn([["a", "b", "c", "d"]])


def test_ess_tail_rejects_bad_prob() -> None:
    x = np.random.default_rng(51).standard_normal((2, 10))
    with pytest.raises(ValueError, match=r"strictly between 0 and 1"):
        ess_tail(x, prob=(0.0, 0.95))
    with pytest.raises(ValueError, match=r"pair of floats"):
        ess_tail(x, prob=(0.05,))


# ---------------------------------------------------------------------------------------
# Virial check
# ---------------------------------------------------------------------------------------


def test_virial_ratio_standard_normal() -> None:
    d, chains, draws = 5, 4, 2000
    w = np.random.default_rng(60).standard_normal((chains, draws, d))
    v = (w * w).sum(-1)  # (w - 0) . grad(|w|^2 / 2) = |w|^2 ~ chi^2_d, mean d
    check = virial_ratio(v, d)
    assert isinstance(check, VirialCheck) and check.d == d
    assert abs(check.ratio - 1.0) < 4 * check.stderr
    # iid draws: stderr = sd(chi^2_d) / (d sqrt(S)) = sqrt(2 / (d S))
    assert check.stderr == pytest.approx(math.sqrt(2 / (d * chains * draws)), rel=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        check.ratio = 1.0  # type: ignore[misc]


def test_virial_ratio_detects_wrong_temperature() -> None:
    # draws from N(0, 1.2^2 I) checked against U = |w|^2 / 2: E[v] / d = 1.44
    d = 5
    w = 1.2 * np.random.default_rng(61).standard_normal((4, 2000, d))
    check = virial_ratio((w * w).sum(-1), d)
    assert check.ratio == pytest.approx(1.44, abs=4 * check.stderr)
    assert (check.ratio - 1.0) / check.stderr > 20


def test_virial_ratio_errors() -> None:
    v = np.ones((2, 10))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=r"d must be a positive integer"):
            virial_ratio(v, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \[chains, draws\], got shape \(2, 10, 1\)"):
        virial_ratio(v[..., None], 3)
    with pytest.raises(ValueError, match=r"displacement_dot_grad contains NaN/inf at chain 0"):
        virial_ratio(np.where(np.arange(10) == 4, np.nan, 1.0)[None], 3)


# ---------------------------------------------------------------------------------------
# mcse_mean_robust and trend (condpost.auto, docs/llc.md)
# ---------------------------------------------------------------------------------------


def test_robust_mcse_matches_the_ar1_truth_and_never_undercuts_ess():
    """AR(1), phi = 0.5: the exact s.e. of the mean is sqrt((1+phi)/(1-phi)/(C·S)).

    Over 50 replicates the reported error averages within [1.0, 1.35]× the truth (the
    maximum of three consistent estimates is slightly conservative) and is never below
    the ESS-based one."""
    from condpost.diagnostics import mcse_mean_robust

    phi, C, S = 0.5, 8, 1000
    truth = math.sqrt((1 + phi) / (1 - phi) / (C * S))
    got = []
    for seed in range(50):
        x = ar1(phi, C, S, seed)
        r = mcse_mean_robust(x)
        assert r.stderr >= r.ess and r.stderr == max(r.ess, r.batch_means, r.chain_means)
        got.append(r.stderr)
    assert 1.0 <= np.mean(got) / truth <= 1.35, np.mean(got) / truth
    r = mcse_mean_robust(ar1(phi, 1, S, 0))
    assert np.isnan(r.chain_means) and r.source in ("ess", "batch_means")
    # the interval widens the chain-means error by Student's t with C − 1 dof
    y = ar1(0.0, 3, 200, 1) + np.array([[0.0], [0.3], [-0.3]])
    r = mcse_mean_robust(y)
    assert r.source == "chain_means"
    assert r.interval_halfwidth() == pytest.approx(4.302653 * r.stderr, rel=1e-5)
    with pytest.raises(ValueError, match="chains, draws"):
        mcse_mean_robust(np.zeros((2, 10, 3)))
    with pytest.raises(ValueError, match="batches"):
        mcse_mean_robust(y, batches=1)


def test_trend_detects_drift_and_passes_stationary_chains():
    from condpost.diagnostics import trend

    flat = [trend(ar1(0.5, 8, 1000, s)).flat() for s in range(40)]
    assert np.mean(flat) >= 0.85  # a 2-error test: about 95% pass
    x = ar1(0.5, 8, 1000, 0) + np.linspace(0, 1, 1000)
    t = trend(x)
    assert t.change == pytest.approx(1.0, abs=0.15) and not t.flat()
    assert t.flat(rel=3.0)  # a change below 3× the mean (0.5) is tolerated on request
