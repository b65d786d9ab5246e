from fedrun.core import RoundContext
import numpy as np

from fedrun.sampling import UniformSampler

SIZES = np.full(50, 10)


def _ctx(round_idx, seed=0):
    return RoundContext(round_idx=round_idx, seed=seed, num_clients=50)


def test_uniform_draws_distinct_clients_of_the_right_count():
    sampler = UniformSampler(clients_per_round=10)
    for r in range(1, 200):
        cohort = sampler.sample(SIZES, _ctx(r))
        assert len(cohort) == 10 and len(set(cohort)) == 10
        assert all(0 <= c < 50 for c in cohort)


def test_uniform_is_a_function_of_seed_and_round_only():
    sampler = UniformSampler(clients_per_round=5)
    assert sampler.sample(SIZES, _ctx(3)) == sampler.sample(SIZES, _ctx(3))
    assert sampler.sample(SIZES, _ctx(3)) != sampler.sample(SIZES, _ctx(4))
    assert sampler.sample(SIZES, _ctx(3, seed=0)) != sampler.sample(SIZES, _ctx(3, seed=1))


def test_uniform_covers_clients_evenly():
    # Each client's inclusion probability is k/N = 0.2; over 2000 rounds the count of each
    # client is Binomial(2000, 0.2): mean 400, sd ~17.9; 5 sd bounds never fail by chance.
    sampler = UniformSampler(clients_per_round=10)
    counts = [0] * 50
    for r in range(2000):
        for c in sampler.sample(SIZES, _ctx(r)):
            counts[c] += 1
    assert all(400 - 90 < n < 400 + 90 for n in counts)
