import re

import numpy as np
import pytest

from fedrun.core import FedrunError, RoundContext
from fedrun.sampling import ClientSampler

SIZES = np.full(50, 10)


def _ctx(round_idx, seed=0):
    return RoundContext(round_idx=round_idx, seed=seed, num_clients=50)


def _sampler(kind: str, clients_per_round: int) -> ClientSampler:
    return ClientSampler(kind=kind, clients_per_round=clients_per_round, dropout=0.0)


def test_uniform_draws_distinct_clients_of_the_right_count():
    sampler = _sampler("uniform", 10)
    for r in range(1, 200):
        cohort = sampler.sample(SIZES, _ctx(r))
        assert len(cohort) == 10 and len(set(cohort)) == 10
        assert all(0 <= c < 50 for c in cohort)


def test_uniform_is_a_function_of_seed_and_round_only():
    sampler = _sampler("uniform", 5)
    assert sampler.sample(SIZES, _ctx(3)) == sampler.sample(SIZES, _ctx(3))
    assert sampler.sample(SIZES, _ctx(3)) != sampler.sample(SIZES, _ctx(4))
    assert sampler.sample(SIZES, _ctx(3, seed=0)) != sampler.sample(SIZES, _ctx(3, seed=1))


def test_uniform_covers_clients_evenly():
    # Each client's inclusion probability is k/N = 0.2; over 2000 rounds the count of each
    # client is Binomial(2000, 0.2): mean 400, sd ~17.9; 5 sd bounds never fail by chance.
    sampler = _sampler("uniform", 10)
    counts = [0] * 50
    for r in range(2000):
        for c in sampler.sample(SIZES, _ctx(r)):
            counts[c] += 1
    assert all(400 - 90 < n < 400 + 90 for n in counts)


def test_poisson_cohort_size_has_mean_q_times_n():
    # Size ~ Binomial(N, q): mean qN = 10, sd sqrt(Nq(1-q)) = 2.83; the mean of R rounds is
    # within 3 standard errors (sd / sqrt(R)) of 10.
    sampler, rounds = _sampler("poisson", 10), 4000
    sizes = np.array([len(sampler.sample(SIZES, _ctx(r))) for r in range(rounds)])
    se = np.sqrt(50 * 0.2 * 0.8) / np.sqrt(rounds)
    assert abs(sizes.mean() - 10) < 3 * se
    assert sizes.min() < 10 < sizes.max()  # the size really varies


def test_dropout_rate_is_as_configured():
    from fedrun.sampling import drop_out

    rounds, k, rate = 3000, 10, 0.3
    dropped = sum(len(drop_out(list(range(k)), rate, _ctx(r))[1]) for r in range(rounds))
    se = np.sqrt(rate * (1 - rate) / (rounds * k))
    assert abs(dropped / (rounds * k) - rate) < 3 * se
    reporting, gone = drop_out(list(range(k)), rate, _ctx(5))
    assert sorted(reporting + gone) == list(range(k)) and not set(reporting) & set(gone)


def test_weighted_sampler_prefers_clients_with_more_examples():
    sizes = np.array([1] * 25 + [20] * 25)
    counts = np.zeros(50)
    for r in range(2000):
        cohort = _sampler("weighted", 5).sample(sizes, _ctx(r))
        assert len(set(cohort)) == 5
        counts[cohort] += 1
    assert counts[25:].mean() > 10 * counts[:25].mean()


@pytest.mark.parametrize("key, value, message", [
    ("kind", "random", "sampler.kind: 'random' is not allowed; allowed: one of uniform, poisson, weighted"),
    ("clients_per_round", 0, "sampler.clients_per_round: 0 is not allowed; allowed: an integer >= 1"),
    ("dropout", 1.0, "sampler.dropout: 1.0 is not allowed; allowed: a number in [0, 1)"),
])
def test_out_of_range_keys_are_refused_by_the_signature(key, value, message):
    from omegaconf import OmegaConf

    from fedrun.components import check_values

    node = OmegaConf.create({"kind": "uniform", "clients_per_round": 10, "dropout": 0.0, key: value})
    with pytest.raises(FedrunError, match=re.escape(message)):
        check_values(node, ClientSampler, "sampler", "sampler")
