import numpy as np
import pytest

from fedrun.data import partition

SIZES_SEEDS = [(n, k, seed) for n, k in [(10, 10), (97, 5), (1000, 30), (5000, 200)] for seed in (0, 1)]


def _labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, num_classes, n)


def _assert_covers_once(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(len(p) > 0 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _label_dists(parts: list[np.ndarray], labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=num_classes) / len(p) for p in parts])


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("n,k,seed", SIZES_SEEDS)
def test_iid_covers_every_example_once_with_sizes_within_one(n, k, seed):
    parts = partition.iid(n, k, np.random.default_rng(seed))
    _assert_covers_once(parts, n, k)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("alpha", [0.01, 0.5, 100.0])
@pytest.mark.parametrize("n,k,seed", SIZES_SEEDS)
def test_dirichlet_covers_every_example_once_and_leaves_no_client_empty(n, k, seed, alpha):
    labels = _labels(n, 10, seed)
    _assert_covers_once(partition.dirichlet(labels, k, alpha=alpha, rng=np.random.default_rng(seed)), n, k)


def test_dirichlet_with_large_alpha_matches_the_global_label_distribution():
    labels = _labels(20_000, 10, 0)
    parts = partition.dirichlet(labels, 20, alpha=1000.0, rng=np.random.default_rng(0))
    overall = np.bincount(labels, minlength=10) / len(labels)
    tv = 0.5 * np.abs(_label_dists(parts, labels, 10) - overall).sum(axis=1)
    assert tv.mean() < 0.1


def test_dirichlet_with_small_alpha_concentrates_each_client_on_few_labels():
    labels = _labels(20_000, 10, 0)
    parts = partition.dirichlet(labels, 20, alpha=0.05, rng=np.random.default_rng(0))
    pooled = _entropy_bits(np.bincount(labels) / len(labels))  # ~log2(10) = 3.32
    mean_client = np.mean([_entropy_bits(d) for d in _label_dists(parts, labels, 10)])
    assert mean_client < pooled / 2


def test_dirichlet_is_a_function_of_the_rng():
    labels = _labels(500, 5, 0)
    a, b, c = (partition.dirichlet(labels, 7, alpha=0.3, rng=np.random.default_rng(s)) for s in (4, 4, 5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("shards_per_client", [1, 2, 3])
@pytest.mark.parametrize("n,k,seed", SIZES_SEEDS[2:])
def test_shards_cover_every_example_once(n, k, seed, shards_per_client):
    labels = _labels(n, 10, seed)
    parts = partition.shards(labels, k, shards_per_client=shards_per_client, rng=np.random.default_rng(seed))
    _assert_covers_once(parts, n, k)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= shards_per_client  # shards differ by at most one


@pytest.mark.parametrize("seed", range(5))
def test_label_pure_shards_give_each_client_at_most_shards_per_client_labels(seed):
    # 10 classes x 60 examples, 100 shards of 6: every shard holds one label.
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(10), 60))
    parts = partition.shards(labels, 50, shards_per_client=2, rng=np.random.default_rng(seed))
    _assert_covers_once(parts, 600, 50)
    assert max(len(np.unique(labels[p])) for p in parts) <= 2


def test_shards_refuse_fewer_examples_than_shards():
    with pytest.raises(ValueError, match="shards"):
        partition.shards(np.zeros(5, dtype=int), 3, rng=np.random.default_rng(0))


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("n,k,seed", SIZES_SEEDS)
def test_power_law_sizes_sum_to_the_examples_and_give_everyone_one(n, k, seed, exponent):
    sizes = partition.power_law_sizes(n, k, exponent=exponent, rng=np.random.default_rng(seed))
    assert sizes.dtype == np.int64 and len(sizes) == k
    assert sizes.sum() == n and sizes.min() >= 1
    _assert_covers_once(partition.split_by_sizes(np.random.default_rng(seed).permutation(n), sizes), n, k)


def test_power_law_sizes_follow_the_rank_law():
    sizes = np.sort(partition.power_law_sizes(100_000, 10, exponent=1.0, rng=np.random.default_rng(0)))[::-1]
    expected = 1 + (100_000 - 10) / np.arange(1, 11) / (1 / np.arange(1, 11)).sum()
    assert np.abs(sizes - expected).max() <= 1


def test_power_law_with_exponent_zero_gives_equal_sizes():
    sizes = partition.power_law_sizes(1000, 10, exponent=0.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(sizes, np.full(10, 100))


def test_power_law_sizes_are_shuffled_over_clients():
    orders = {tuple(np.argsort(partition.power_law_sizes(1000, 8, exponent=1.5, rng=np.random.default_rng(s))))
              for s in range(5)}
    assert len(orders) > 1


def test_split_by_sizes_keeps_the_order_and_checks_the_total():
    parts = partition.split_by_sizes(np.array([5, 3, 9, 1]), [1, 3])
    assert [p.tolist() for p in parts] == [[5], [3, 9, 1]]
    with pytest.raises(ValueError, match="sum"):
        partition.split_by_sizes(np.arange(4), [1, 2])
