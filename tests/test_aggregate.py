import numpy as np
import torch

from fedrun.core import ClientUpdate
from fedrun.strategies.aggregate import weighted_mean
from fedrun.strategies.fedavg import FedAvg


def _update(cid, delta, n):
    return ClientUpdate(client_id=cid, delta=delta, num_examples=n, train_loss=0.0, seconds=0.0, bytes_up=0)


def test_weighted_mean_matches_numpy_for_unequal_sizes():
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=50).astype(np.float32) for _ in range(4)]
    sizes = [1, 7, 30, 2]
    expected = sum(n * d.astype(np.float64) for n, d in zip(sizes, deltas)) / sum(sizes)
    got = weighted_mean([torch.from_numpy(d) for d in deltas], sizes)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6)


def test_fedavg_new_weights_are_example_weighted_average_of_client_models():
    # Hand-computed: clients at w=[1, 2] (n=1) and w=[4, 8] (n=3) from global [0, 0]
    # -> w = 1/4 * [1, 2] + 3/4 * [4, 8] = [3.25, 6.5].
    strategy = FedAvg()
    weights = torch.zeros(2)
    updates = [_update(0, torch.tensor([1.0, 2.0]), 1), _update(1, torch.tensor([4.0, 8.0]), 3)]
    new = strategy.apply(weights, strategy.aggregate(updates))
    assert new.tolist() == [3.25, 6.5]


def test_fedavg_of_identical_clients_is_that_client():
    delta = torch.randn(10)
    updates = [_update(i, delta.clone(), n) for i, n in enumerate([3, 5, 9])]
    torch.testing.assert_close(FedAvg().aggregate(updates), delta, rtol=0, atol=1e-7)
