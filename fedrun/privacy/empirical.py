"""Empirical epsilon: how far apart two score distributions are, as a DP epsilon at delta.

Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning" (ICLR 2024):
the cosines of inserted canary directions with the model's change and those of directions
never inserted are fitted as Gaussians, and the epsilon of the mechanism that outputs a draw of
one or the other is the estimate (their §3; a point estimate, not a bound). Beside it,
`epsilon_lower_bound` gives the classic membership-test bound (Jagielski et al. 2020) with
Jeffreys intervals at confidence 1 - alpha, as the paper's tables do: an epsilon that the
observed cosines support with that confidence.

The epsilon of two Gaussians P = N(mu1, s1^2), Q = N(mu2, s2^2) at delta is the smallest eps
with max(delta(P||Q), delta(Q||P)) <= delta, where delta(P||Q) = P(L > eps) - e^eps Q(L > eps)
and L = log p(x)/q(x) is a quadratic in x (Steinke 2022, "Composition of Differential Privacy &
Privacy Amplification by Subsampling", §4), so both probabilities are normal CDFs between
its roots. Everything is in log space: deltas of 1e-10 stay exact.
"""
from __future__ import annotations

import math

import numpy as np

# scipy is imported where it is used: a run without audit=epsilon never loads it (tests/test_scale.py).

CONFIDENCE = 0.95  # of `epsilon_lower_bound`, as in the paper


def _log_tail_mass(lo: float, hi: float, mu: float, sd: float) -> float:
    """log P(lo < X < hi) for X ~ N(mu, sd^2), lo < hi (either may be infinite)."""
    from scipy import special

    a, b = (lo - mu) / sd, (hi - mu) / sd
    if a > 0:  # both in the upper tail: use the mirror image, where logcdf is accurate
        a, b = -b, -a
    log_b, log_a = special.log_ndtr(b), special.log_ndtr(a)
    if log_a == -math.inf:
        return float(log_b)
    return float(log_b + np.log1p(-math.exp(min(log_a - log_b, 0.0)))) if log_a < log_b else -math.inf


def _log_region_masses(mu1: float, sd1: float, mu2: float, sd2: float, eps: float) -> tuple[float, float]:
    """log P(L > eps) under P and under Q, L(x) = log N(x; mu1, sd1) - log N(x; mu2, sd2)."""
    from scipy import special

    # L(x) = a x^2 + b x + c
    a = 0.5 * (sd2**-2 - sd1**-2)
    b = mu1 / sd1**2 - mu2 / sd2**2
    c = 0.5 * ((mu2 / sd2) ** 2 - (mu1 / sd1) ** 2) + math.log(sd2 / sd1)
    if a == 0:
        if b == 0:  # identical distributions: L = 0 everywhere
            return (0.0, 0.0) if c > eps else (-math.inf, -math.inf)
        t = (eps - c) / b
        region = [(t, math.inf)] if b > 0 else [(-math.inf, t)]
    else:
        disc = b * b - 4 * a * (c - eps)
        if disc <= 0:  # L - eps keeps the sign of a everywhere
            region = [(-math.inf, math.inf)] if a > 0 else []
        else:
            r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
            region = [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]
    if not region:
        return -math.inf, -math.inf
    p = special.logsumexp([_log_tail_mass(lo, hi, mu1, sd1) for lo, hi in region])
    q = special.logsumexp([_log_tail_mass(lo, hi, mu2, sd2) for lo, hi in region])
    return float(p), float(q)


def log_delta_gaussians(mu1: float, sd1: float, mu2: float, sd2: float, eps: float) -> float:
    """log delta(P||Q) at eps for P = N(mu1, sd1^2), Q = N(mu2, sd2^2); -inf when it is 0."""
    log_p, log_q = _log_region_masses(mu1, sd1, mu2, sd2, eps)
    if log_p == -math.inf or eps + log_q >= log_p:
        return -math.inf
    return log_p + math.log1p(-math.exp(eps + log_q - log_p))


def epsilon_two_gaussians(mu1: float, sd1: float, mu2: float, sd2: float, delta: float) -> float:
    """The smallest eps >= 0 at which N(mu1, sd1^2) and N(mu2, sd2^2) are (eps, delta)-close both ways."""
    from scipy import optimize

    if not (sd1 > 0 and sd2 > 0 and 0 < delta < 1):
        raise ValueError(f"standard deviations must be > 0 and delta in (0, 1); got {sd1}, {sd2}, {delta}")
    log_delta = math.log(delta)

    def excess(eps: float) -> float:
        return max(log_delta_gaussians(mu1, sd1, mu2, sd2, eps), log_delta_gaussians(mu2, sd2, mu1, sd1, eps)) \
            - log_delta

    if excess(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while excess(hi) > 0:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf  # the two fits do not overlap at any resolution a float has
    return float(optimize.brentq(excess, lo, hi, xtol=1e-12, rtol=1e-10))


def gaussian_fit(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (n - 1 in the denominator) of `values`."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1))


def estimate(seen: np.ndarray, unseen: np.ndarray, delta: float) -> float:
    """The paper's estimate: the epsilon separating Gaussian fits of the unseen and seen cosines.

    NaN when there are fewer than two of either (no spread to fit)."""
    if len(seen) < 2 or len(unseen) < 2:
        return math.nan
    (mu0, sd0), (mu1, sd1) = gaussian_fit(unseen), gaussian_fit(seen)
    if sd0 == 0 or sd1 == 0:
        return math.nan
    return epsilon_two_gaussians(mu0, sd0, mu1, sd1, delta)


def noise_floor(seen: int, unseen: int, delta: float, *, draws: int = 64, seed: int = 0) -> float:
    """The median estimate when nothing leaks: `seen` and `unseen` cosines from one distribution.

    Gaussian fits of a few dozen samples differ in spread by chance, and at small delta a spread
    ratio alone separates two Gaussians (20 + 20 samples: ~3.8 at delta 1e-5; 1000 + 1000: ~0.4).
    An estimate near this floor says the run leaked nothing the canaries could resolve."""
    if seen < 2 or unseen < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    return float(np.median([estimate(rng.standard_normal(seen), rng.standard_normal(unseen), delta)
                            for _ in range(draws)]))


def bootstrap_interval(seen: np.ndarray, unseen: np.ndarray, delta: float, *, draws: int = 100,
                       level: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """The central `level` interval of the estimate over resamples (with replacement) of both sets:
    how far the point estimate moves with the canaries drawn. NaN where it cannot be estimated."""
    seen, unseen = np.asarray(seen, np.float64), np.asarray(unseen, np.float64)
    if len(seen) < 2 or len(unseen) < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = [estimate(rng.choice(seen, len(seen)), rng.choice(unseen, len(unseen)), delta) for _ in range(draws)]
    low, high = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _jeffreys_upper(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
    """One-sided upper confidence limit 1 - alpha of a binomial rate (Jeffreys' Beta(1/2, 1/2) prior)."""
    from scipy import stats

    return stats.beta.ppf(1 - alpha, successes + 0.5, trials - successes + 0.5)


def epsilon_lower_bound(seen: np.ndarray, unseen: np.ndarray, delta: float, *, alpha: float = 1 - CONFIDENCE) -> float:
    """An epsilon the membership test "cosine >= t" proves with confidence 1 - alpha, best t.

    For threshold t: FPR = unseen >= t, FNR = seen < t, both replaced by Jeffreys upper limits;
    (eps, delta)-DP requires FNR + e^eps FPR >= 1 - delta (and the mirror), so
    eps >= max(log((1 - delta - FNR) / FPR), log((1 - delta - FPR) / FNR))."""
    seen, unseen = np.sort(np.asarray(seen, np.float64)), np.sort(np.asarray(unseen, np.float64))
    if not len(seen) or not len(unseen):
        return math.nan
    thresholds = np.concatenate([seen, unseen])
    false_pos = len(unseen) - np.searchsorted(unseen, thresholds, side="left")  # unseen >= t
    false_neg = np.searchsorted(seen, thresholds, side="left")  # seen < t
    fpr = _jeffreys_upper(false_pos, len(unseen), alpha)
    fnr = _jeffreys_upper(false_neg, len(seen), alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        bounds = np.fmax(np.log(1 - delta - fnr) - np.log(fpr), np.log(1 - delta - fpr) - np.log(fnr))
    bounds = bounds[np.isfinite(bounds)]
    return float(max(bounds.max(), 0.0)) if len(bounds) else 0.0
