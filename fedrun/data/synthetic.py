"""Synthetic(alpha, beta): the federated classification data of FedProx.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks", section 5.1, following
its public `generate_synthetic.py`. Client k draws u_k ~ N(0, alpha), B_k ~ N(0, beta),
W_k ~ N(u_k, 1) (classes x features), b_k ~ N(u_k, 1) and feature means v_k ~ N(B_k, 1);
its examples are x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2, and labels
y = argmax(softmax(W_k x + b_k)). N(0, alpha) is read as the reference code does,
`np.random.normal(0, alpha)`: alpha and beta are standard deviations, not variances.
alpha sets how much the clients' models differ, beta how much their inputs do.
Client sizes follow the code's power law, int(lognormal(4, 2)) + 50 (mean ~450: 100,000
clients hold ~45M examples, ~11 GB); `max_client_examples` caps them, keeping each capped
client's first examples, so capping never changes what the other clients hold.
`iid=True` is the paper's Synthetic_IID, again as in its code: one W, b ~ N(0, 1) and
v = 0 shared by all clients (alpha and beta are then unused).

`partition="natural"` keeps one client per generating distribution; "iid", "dirichlet"
and "shards" pool every example and deal them out again with `fedrun.data.partition`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch

from fedrun.components import OneOf, Range
from fedrun.core import FedrunError, Stream, numpy_rng
from fedrun.data import partition as partitioners
from fedrun.data.examples import FederatedData, Labelled, PackedClients, pack_parts
from fedrun.data.text import TEST_FRACTION, num_test

PARTITIONS = ("natural", "iid", "dirichlet", "shards")
MIN_CLIENT_SIZE = 50  # the "+ 50" of the reference code's client sizes
# Keys of the derived random streams (all under Stream.PARTITION).
_PARAMETERS, _FEATURES, _REPARTITION = 1, 2, 3
_BLOCK = 64  # rows of Gaussian noise per draw (see _noise)


@dataclass
class Population:
    """What each client's data is drawn from; row k belongs to client k."""

    sizes: np.ndarray  # (K,) int64 examples per client
    weights: np.ndarray  # (K, C, F) float64
    biases: np.ndarray  # (K, C) float64
    means: np.ndarray  # (K, F) float64

    def feature_std(self) -> np.ndarray:
        """(F,) sqrt of Sigma_jj = j^-1.2, j = 1..F."""
        return np.arange(1, self.means.shape[1] + 1, dtype=np.float64) ** -0.6


def population(*, alpha: float, beta: float, num_clients: int, num_features: int,
               num_classes: int, iid: bool, rng: np.random.Generator,
               max_client_examples: int | None = None) -> Population:
    """Draw client sizes (capped at `max_client_examples`) and each client's W_k, b_k and v_k."""
    K, C, F = num_clients, num_classes, num_features
    sizes = rng.lognormal(4, 2, K).astype(np.int64) + MIN_CLIENT_SIZE
    if max_client_examples is not None:
        sizes = np.minimum(sizes, max_client_examples)
    if iid:
        weights = np.broadcast_to(rng.normal(0, 1, (C, F)), (K, C, F))
        biases = np.broadcast_to(rng.normal(0, 1, C), (K, C))
        return Population(sizes, weights, biases, np.zeros((K, F)))
    u = rng.normal(0, alpha, K)
    centres = rng.normal(0, beta, K)
    weights = rng.normal(u[:, None, None], 1, (K, C, F))
    biases = rng.normal(u[:, None], 1, (K, C))
    means = rng.normal(centres[:, None], 1, (K, F))
    return Population(sizes, weights, biases, means)


def generate(pop: Population, *, seed: int, test_fraction: float = 0.0) -> PackedClients:
    """Each client's examples, (n_k, F) float32 features and (n_k,) int64 labels, packed:
    its first examples in the train pack, its last `test_fraction` in the test pack.

    Client k draws from its own stream, seeded by word k of SeedSequence(seed, PARTITION,
    FEATURES) (one call derives all K seeds; word k does not depend on K), so its examples do
    not depend on the other clients (a cap keeps a prefix of them). The packs are filled in
    place, without a tensor per client. torch draws the Gaussian noise (the bulk of the work)
    about 3x faster than numpy. Labels are the argmax of the logits (softmax does not change
    it), computed in float64 from the stored float32 features.
    """
    sizes = pop.sizes.astype(np.int64)
    tests = np.array([num_test(n, test_fraction) for n in sizes.tolist()], dtype=np.int64)
    train_off = np.concatenate([[0], np.cumsum(sizes - tests)])
    test_off = np.concatenate([[0], np.cumsum(tests)])
    num_features = pop.means.shape[1]
    train = Labelled(torch.empty(int(train_off[-1]), num_features), torch.empty(int(train_off[-1]), dtype=torch.int64))
    test = Labelled(torch.empty(int(test_off[-1]), num_features), torch.empty(int(test_off[-1]), dtype=torch.int64))
    std = torch.from_numpy(pop.feature_std()).float()
    weights, biases, means = (_rows(a) for a in (pop.weights, pop.biases, pop.means))
    seeds = np.random.SeedSequence([seed, Stream.PARTITION, _FEATURES]).generate_state(len(sizes), np.uint64) >> 1
    generator = torch.Generator()
    # Thousands of tiny ops: one thread is several times faster than a pool that must wake for
    # each (and leaves the labels independent of the machine's thread count).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for k, (size, a, c) in enumerate(zip(sizes.tolist(), train_off.tolist(), test_off.tolist())):
            x = _noise(size, num_features, generator.manual_seed(int(seeds[k]))) * std + means[k].float()
            y = torch.addmm(biases[k], x.double(), weights[k].T).argmax(1)
            n_train = size - int(tests[k])
            train.features[a : a + n_train], train.labels[a : a + n_train] = x[:n_train], y[:n_train]
            test.features[c : c + size - n_train], test.labels[c : c + size - n_train] = x[n_train:], y[n_train:]
    finally:
        torch.set_num_threads(threads)
    return PackedClients(train, test, train_offsets=train_off, test_offsets=test_off, names="synthetic_")


def _noise(rows: int, num_features: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, F) standard normal draws, made _BLOCK rows per call: torch fills the tail of a
    tensor differently from its body, so one call of n rows does not begin with one call of
    m < n rows; blocks of a fixed size do, whatever the client's size."""
    noise = torch.empty(-(-rows // _BLOCK) * _BLOCK, num_features)
    for start in range(0, len(noise), _BLOCK):
        torch.randn(_BLOCK, num_features, generator=generator, out=noise[start : start + _BLOCK])
    return noise[:rows]


def _rows(a: np.ndarray) -> torch.Tensor:
    """(K, ...) per-client rows as a tensor without copying them all; Synthetic_IID's rows are
    one read-only row broadcast to K, which stays one row."""
    if a.strides[0] == 0:
        return torch.from_numpy(np.array(a[0])).expand(a.shape)
    return torch.from_numpy(np.ascontiguousarray(a))


class Synthetic:
    """`data=synthetic`: Synthetic(alpha, beta) over `num_clients` clients."""

    data_kind = "labelled"

    def __init__(self, *, alpha: Annotated[float, Range(ge=0)], beta: Annotated[float, Range(ge=0)],
                 num_clients: Annotated[int, Range(ge=1)], num_features: Annotated[int, Range(ge=1)],
                 num_classes: Annotated[int, Range(ge=2)], iid: bool, partition: Annotated[str, OneOf(*PARTITIONS)],
                 dirichlet_alpha: Annotated[float, Range(gt=0)], size_skew: Annotated[float, Range(ge=0)],
                 test_fraction: Annotated[float, TEST_FRACTION],
                 max_client_examples: Annotated[int, Range(ge=1)] | None):
        if size_skew > 0 and partition != "iid":
            raise FedrunError(f"data.size_skew: applies to partition=iid only, got {size_skew} with "
                              f"partition={partition}")
        self.alpha, self.beta, self.iid = alpha, beta, iid
        self.num_clients, self.num_features, self.num_classes = num_clients, num_features, num_classes
        self.partition, self.dirichlet_alpha, self.size_skew = partition, dirichlet_alpha, size_skew
        self.test_fraction, self.max_client_examples = test_fraction, max_client_examples

    def implicit_sources(self) -> list[dict[str, Any]]:
        return []  # it reads nothing

    def load(self, *, seed: int, insert: Any = None, tokenizer: Any = None) -> FederatedData:
        """The federated data (`insert` and `tokenizer` are for text: the builder never gives them)."""
        rng = numpy_rng(seed, Stream.PARTITION, _PARAMETERS)
        pop = population(alpha=self.alpha, beta=self.beta, num_clients=self.num_clients,
                         num_features=self.num_features, num_classes=self.num_classes, iid=self.iid,
                         max_client_examples=self.max_client_examples, rng=rng)
        if self.partition == "natural":
            clients = generate(pop, seed=seed, test_fraction=self.test_fraction)
        else:
            pooled = generate(pop, seed=seed).train
            assert isinstance(pooled, Labelled)
            del pop  # its (K, C, F) client models, before pack_parts copies the examples
            clients = self._repartition(pooled, seed)
        return FederatedData(clients, self._fingerprint(clients, seed),
                             model_dims={"num_features": self.num_features, "num_classes": self.num_classes})

    def _repartition(self, pooled: Labelled, seed: int) -> PackedClients:
        """Every example pooled and dealt out again by `partition`."""
        rng = numpy_rng(seed, Stream.PARTITION, _REPARTITION)
        parts = _repartition(pooled.labels.numpy(), partition=self.partition, num_clients=self.num_clients,
                             dirichlet_alpha=self.dirichlet_alpha, size_skew=self.size_skew, rng=rng)
        # The text sources' split, by position, so both kinds hold out the same share.
        cuts = [len(part) - num_test(len(part), self.test_fraction) for part in parts]
        return pack_parts(pooled, [p[:n] for p, n in zip(parts, cuts)], pooled, [p[n:] for p, n in zip(parts, cuts)],
                          names="synthetic_")

    def _fingerprint(self, clients: PackedClients, seed: int) -> dict[str, Any]:
        return {
            "source": "synthetic", "alpha": self.alpha, "beta": self.beta, "iid": self.iid,
            "num_features": self.num_features, "num_classes": self.num_classes, "partition": self.partition,
            "test_fraction": self.test_fraction,
            **({"dirichlet_alpha": self.dirichlet_alpha} if self.partition == "dirichlet" else {}),
            **({"size_skew": self.size_skew} if self.size_skew else {}),
            **({"max_client_examples": self.max_client_examples} if self.max_client_examples is not None else {}),
            "clients": len(clients),
            "train_examples": len(clients.train),
            "test_examples": len(clients.test),
            "seed": seed,
        }


def _repartition(labels: np.ndarray, *, partition: str, num_clients: int, dirichlet_alpha: float,
                 size_skew: float, rng: np.random.Generator) -> list[np.ndarray]:
    if partition == "dirichlet":
        return partitioners.dirichlet(labels, num_clients, alpha=dirichlet_alpha, rng=rng)
    if partition == "shards":
        return partitioners.shards(labels, num_clients, rng=rng)
    if size_skew == 0:
        return partitioners.iid(len(labels), num_clients, rng)
    sizes = partitioners.power_law_sizes(len(labels), num_clients, exponent=size_skew, rng=rng)
    return partitioners.split_by_sizes(rng.permutation(len(labels)), sizes)
