
import re

import numpy as np
import pytest
import torch

from fedrun.core import FedrunError, Stream, numpy_rng
from fedrun.data import synthetic as syn
from fedrun.data.examples import Labelled
from fedrun.data.stats import partition_stats

DEFAULTS = dict(alpha=1.0, beta=1.0, num_clients=12, num_features=60, num_classes=10, iid=False,
                partition="natural", dirichlet_alpha=0.5, size_skew=0.0, test_fraction=0.2, max_client_examples=None,
                seed=0)


def _data(**kw):
    keys = DEFAULTS | kw
    seed = keys.pop("seed")
    return syn.Synthetic(**keys).load(seed=seed)


def _pop(seed=0, **kw):
    opts = {k: DEFAULTS[k] for k in ("alpha", "beta", "num_clients", "num_features", "num_classes", "iid")}
    return syn.population(**(opts | kw), rng=numpy_rng(seed, Stream.PARTITION, 1))


def test_clients_hold_float32_features_and_int64_labels():
    data = _data()
    assert data.num_clients == 12
    assert [c.name for c in data.clients] == [f"synthetic_{k}" for k in range(12)]
    assert data.model_dims == {"num_features": 60, "num_classes": 10}
    for c in data.clients:
        for part in (c.train, c.test):
            assert isinstance(part, Labelled)
            assert part.features.dtype == torch.float32 and part.features.shape[1] == 60
            assert part.labels.dtype == torch.int64 and part.labels.shape == (len(part.features),)
            assert 0 <= part.labels.min() and part.labels.max() < 10


def test_fingerprint_counts_examples_and_records_the_recipe():
    data = _data()
    fp = data.fingerprint
    assert fp["source"] == "synthetic" and fp["partition"] == "natural" and fp["seed"] == 0
    assert (fp["alpha"], fp["beta"], fp["iid"], fp["clients"]) == (1.0, 1.0, False, 12)
    assert fp["train_examples"] == sum(len(c.train) for c in data.clients)
    assert fp["test_examples"] == sum(len(c.test) for c in data.clients) == len(data.test_examples())


def test_natural_clients_have_the_generated_sizes_of_at_least_fifty_split_by_position():
    data, pop = _data(), _pop()
    sizes = np.array([len(c.train) + len(c.test) for c in data.clients])
    np.testing.assert_array_equal(sizes, pop.sizes)
    assert sizes.min() >= 50
    for c in data.clients:
        n = len(c.train) + len(c.test)
        assert len(c.test) == max(1, int(n * 0.2))


def test_labels_are_the_argmax_of_each_clients_own_linear_model():
    # Independent oracle: numpy float64 logits W_k x + b_k from the drawn parameters.
    data, pop = _data(), _pop()
    for k, c in enumerate(data.clients):
        x = torch.cat([c.train.features, c.test.features]).double().numpy()
        y = torch.cat([c.train.labels, c.test.labels]).numpy()
        np.testing.assert_array_equal(y, np.argmax(x @ pop.weights[k].T + pop.biases[k], axis=1))


def test_features_have_the_client_means_and_the_power_law_covariance():
    pop = _pop(num_clients=3, num_features=8)
    pop.sizes[:] = 40_000
    clients = syn.generate(pop, seed=0)
    var = (np.arange(1, 9) ** -1.2)
    for k, c in enumerate(client.train for client in clients):
        x = c.features.double().numpy()
        np.testing.assert_allclose(x.mean(0), pop.means[k], atol=4 * np.sqrt(var / 40_000).max())
        np.testing.assert_allclose(x.var(0), var, rtol=0.05)


def test_priors_spread_clients_by_alpha_and_beta():
    # u_k ~ N(0, alpha) is the mean of W_k's entries; B_k ~ N(0, beta) of v_k's (std, as in the code).
    pop = _pop(alpha=3.0, beta=0.0, num_clients=2000, num_features=60)
    assert np.std(pop.weights.mean(axis=(1, 2))) == pytest.approx(3.0, rel=0.1)
    assert np.std(pop.means.mean(axis=1)) == pytest.approx(np.sqrt(1 / 60), rel=0.1)  # B_k = 0


def test_iid_shares_one_model_and_zero_input_mean():
    pop = _pop(iid=True)
    assert np.all(pop.weights == pop.weights[0]) and np.all(pop.biases == pop.biases[0])
    assert np.all(pop.means == 0)


def test_same_seed_same_data_and_another_seed_other_data():
    a, b, c = _data(seed=3), _data(seed=3), _data(seed=4)
    assert torch.equal(a.test_examples().features, b.test_examples().features)
    assert all(torch.equal(x.train.labels, y.train.labels) for x, y in zip(a.clients, b.clients))
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint["train_examples"] != c.fingerprint["train_examples"]


def test_iid_clients_have_closer_label_distributions_than_heterogeneous_ones():
    iid = partition_stats(_data(iid=True, num_clients=30))
    skewed = partition_stats(_data(num_clients=30))

    def gap(s):
        return s["label_entropy_pooled_bits"] - s["label_entropy_mean_bits"]

    assert gap(iid) < 0.5 < gap(skewed)


@pytest.mark.parametrize("partition", ["iid", "dirichlet", "shards"])
def test_repartitions_keep_every_example_once(partition):
    natural, data = _data(), _data(partition=partition, num_clients=12)
    assert data.num_clients == 12 and data.fingerprint["partition"] == partition

    def pooled(d):
        return torch.cat([torch.cat([c.train.labels, c.test.labels]) for c in d.clients])

    assert torch.equal(pooled(natural).sort().values, pooled(data).sort().values)
    n = natural.fingerprint["train_examples"] + natural.fingerprint["test_examples"]
    assert data.fingerprint["train_examples"] + data.fingerprint["test_examples"] == n


def test_dirichlet_repartition_skews_labels_more_than_iid():
    iid = partition_stats(_data(partition="iid", iid=True))
    skewed = partition_stats(_data(partition="dirichlet", dirichlet_alpha=0.05, iid=True))
    assert skewed["label_entropy_mean_bits"] < iid["label_entropy_mean_bits"] - 1


def test_size_skew_makes_iid_client_sizes_unequal():
    even = partition_stats(_data(partition="iid"))
    skewed = partition_stats(_data(partition="iid", size_skew=1.5))
    assert even["train_max"] - even["train_min"] <= 2
    assert skewed["train_max"] > 5 * skewed["train_min"]
    assert _data(partition="iid", size_skew=1.5).fingerprint["size_skew"] == 1.5


@pytest.mark.parametrize("kw,message", [
    (dict(partition="speakers"),
     "data.partition: 'speakers' is not allowed; allowed: one of natural, iid, dirichlet, shards"),
    (dict(dirichlet_alpha=0.0), "data.dirichlet_alpha: 0.0 is not allowed; allowed: a number > 0"),
    (dict(test_fraction=1.0), "data.test_fraction: 1.0 is not allowed; allowed: a number in (0, 1): eval_loss"),
    (dict(num_classes=1), "data.num_classes: 1 is not allowed; allowed: an integer >= 2"),
    (dict(size_skew=-1.0), "data.size_skew: -1.0 is not allowed; allowed: a number >= 0"),
    (dict(max_client_examples=0), "data.max_client_examples: 0 is not allowed; allowed: null or an integer >= 1"),
])
def test_out_of_range_keys_are_refused_by_the_signature(kw, message):
    from omegaconf import OmegaConf

    from fedrun.components import check_values

    keys = {k: v for k, v in (DEFAULTS | kw).items() if k != "seed"}
    with pytest.raises(FedrunError, match=re.escape(message)):
        check_values(OmegaConf.create(keys), syn.Synthetic, "data", "data")


def test_size_skew_outside_iid_is_a_user_error():
    with pytest.raises(FedrunError, match="data.size_skew: applies to partition=iid only"):
        _data(partition="dirichlet", size_skew=1.0)


def test_partition_stats_reports_sizes_for_text_data_too():
    from fedrun.data.examples import ClientData, FederatedData, Windows
    clients = [ClientData(str(n), Windows(torch.zeros(n, 5, dtype=torch.uint8)), Windows(torch.zeros(1, 5)))
               for n in (3, 4, 10)]
    stats = partition_stats(FederatedData(clients, {}))
    assert stats == {"clients": 3, "train_min": 3, "train_median": 4.0, "train_max": 10, "train_total": 17}


def test_ten_thousand_small_clients_build_into_one_packed_tensor():
    # Speed is measured by benchmarks/ (W3), not here: this checks the shape that makes it cheap.
    data = _data(num_clients=10_000, num_features=2)
    assert data.num_clients == 10_000
    assert data.client_sizes().sum() == len(data.clients.train)
