"""What skipping small secure-aggregation rounds costs a DP guarantee, and how it is charged.

Secure aggregation must not run on a cohort too small to hide anyone (`secagg_min_clients`,
and the Shamir threshold t of the survivors), so such a round is skipped. Under DP-FedAvg that
skip is itself an output that depends on who was sampled: with the others' cohort just below
the minimum, one user's presence turns a skipped round (the model kept) into an aggregated one.
Outside that event the round is the usual subsampled Gaussian mechanism.

Charge. Let gamma be the probability, per round, that one user's presence flips the skip
decision: with n others sampled (Binomial(N - 1, q)) of whom s survive (Binomial(n, 1 - p),
p the dropout), and agg(n, s) = [n >= m and s >= t(n) and n fits the fixed-point capacity],
gamma = q sum_{n,s} P(n, s) [(1 - p) 1{agg(n+1, s+1) != agg(n, s)} + p 1{agg(n+1, s) != agg(n, s)}].
A hybrid argument (replace the flipped rounds of the neighbouring run by the rounds of the run
without the user: the two differ with probability <= T gamma, and every other round pair is
dominated by the subsampled Gaussian's) gives (epsilon, delta_acc + e^epsilon T gamma)-DP,
where epsilon is the accountant's at delta_acc. `epsilon_with_skips` chooses delta_acc so the
total is the run's delta.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedrun.privacy.secure_round import most_bits, shamir_threshold

MARGIN = 1e-3  # slack in epsilon that makes the fixed-point search below a valid certificate


def flip_probability(*, num_clients: int, sample_rate: float, dropout: float, min_clients: int,
                     threshold_fraction: float, bits: int | None) -> float:
    """gamma: the per-round probability that one user's presence flips the skip decision."""
    from scipy.stats import binom  # ~1 s to import: only runs that combine DP and secure aggregation pay it

    others = np.arange(num_clients)  # n: how many of the N - 1 others are sampled
    p_n = binom.pmf(others, num_clients - 1, sample_rate)
    keep = p_n > 1e-300
    gamma = 0.0
    for n, pn in zip(others[keep].tolist(), p_n[keep].tolist()):
        t = shamir_threshold(n, threshold_fraction)
        # Past the cohort-size boundaries (n + 1 = m, or the capacity), agg(n + 1, .) and
        # agg(n, .) can differ for any s; elsewhere only at s = t - 1 or t (t(n + 1) <= t(n) + 1).
        boundary = n + 1 == min_clients or (bits is not None and bits <= most_bits(n) and bits > most_bits(n + 1))
        for s in range(0, n + 1) if boundary else range(max(0, t - 2), min(n, t + 1) + 1):
            ps = binom.pmf(s, n, 1 - dropout) if dropout > 0 else float(s == n)
            if ps == 0:
                continue
            flip = (1 - dropout) * (_aggregated(n + 1, s + 1, min_clients, threshold_fraction, bits)
                                    != _aggregated(n, s, min_clients, threshold_fraction, bits))
            flip += dropout * (_aggregated(n + 1, s, min_clients, threshold_fraction, bits)
                               != _aggregated(n, s, min_clients, threshold_fraction, bits))
            gamma += pn * ps * flip
    return sample_rate * gamma


def _aggregated(n: int, survivors: int, min_clients: int, threshold_fraction: float, bits: int | None) -> bool:
    fits = bits is None or bits <= most_bits(n)
    return n >= min_clients and survivors >= shamir_threshold(n, threshold_fraction) and fits


def epsilon_with_skips(epsilon_at: Callable[[float], float], *, delta: float, gamma: float) -> float:
    """The least epsilon found such that epsilon_at(delta_acc) = epsilon and delta_acc + e^epsilon gamma <= delta.

    Each step evaluates the accountant at delta_acc = delta - e^(eps + MARGIN) gamma; a result
    within eps + MARGIN certifies itself. inf when no delta_acc > 0 is left."""
    if gamma <= 0:
        return epsilon_at(delta)
    eps = 0.0
    for _ in range(50):
        delta_acc = delta - math.exp(eps + MARGIN) * gamma
        if delta_acc <= 0:
            return math.inf
        found = epsilon_at(delta_acc)
        if found <= eps + MARGIN:
            return found
        eps = found
    return math.inf


def calibration_delta(*, delta: float, target_epsilon: float, gamma_total: float) -> float:
    """The delta to calibrate noise at so that `epsilon_with_skips` stays within target_epsilon."""
    return delta - math.exp(target_epsilon + MARGIN) * gamma_total
