"""Synthetic(alpha, beta): the federated classification data of FedProx.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks", section 5.1, following
its public `generate_synthetic.py`. Client k draws u_k ~ N(0, alpha), B_k ~ N(0, beta),
W_k ~ N(u_k, 1) (classes x features), b_k ~ N(u_k, 1) and feature means v_k ~ N(B_k, 1);
its examples are x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2, and labels
y = argmax(softmax(W_k x + b_k)). N(0, alpha) is read as the reference code does,
`np.random.normal(0, alpha)`: alpha and beta are standard deviations, not variances.
alpha sets how much the clients' models differ, beta how much their inputs do.
Client sizes follow the code's power law, int(lognormal(4, 2)) + 50.
`iid=True` is the paper's Synthetic_IID, again as in its code: one W, b ~ N(0, 1) and
v = 0 shared by all clients (alpha and beta are then unused).

`partition="natural"` keeps one client per generating distribution; "iid", "dirichlet"
and "shards" pool every example and deal them out again with `fedrun.data.partition`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrun.core import FedrunError, Stream, numpy_rng, torch_generator
from fedrun.data import partition as partitioners
from fedrun.data.examples import ClientData, FederatedData, Labelled, concat
from fedrun.data.text import split_by_position

PARTITIONS = ("natural", "iid", "dirichlet", "shards")
MIN_CLIENT_SIZE = 50  # the "+ 50" of the reference code's client sizes
# Keys of the derived random streams (all under Stream.PARTITION).
_PARAMETERS, _FEATURES, _REPARTITION = 1, 2, 3


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
               num_classes: int, iid: bool, rng: np.random.Generator) -> Population:
    """Draw client sizes and each client's W_k, b_k and v_k."""
    K, C, F = num_clients, num_classes, num_features
    sizes = rng.lognormal(4, 2, K).astype(np.int64) + MIN_CLIENT_SIZE
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


def generate(pop: Population, *, generator: torch.Generator) -> list[Labelled]:
    """Each client's examples: (n_k, F) float32 features and (n_k,) int64 labels.

    The Gaussian noise is the bulk of the work; torch draws it about 3x faster than numpy,
    hence a torch generator. Each client gets its own tensors (not views of one pooled
    tensor, which would travel whole with any client sent to another process). Labels are
    the argmax of the logits (softmax does not change it), computed in float64 from the
    stored float32 features.
    """
    std = torch.from_numpy(pop.feature_std()).float()
    weights, biases, means = (torch.from_numpy(np.ascontiguousarray(a)) for a in
                              (pop.weights, pop.biases, pop.means))
    clients = []
    for k, size in enumerate(pop.sizes.tolist()):
        x = torch.randn(size, len(std), generator=generator) * std + means[k].float()
        y = torch.addmm(biases[k], x.double(), weights[k].T).argmax(1)
        clients.append(Labelled(x, y))
    return clients


def synthetic(*, alpha: float, beta: float, num_clients: int, num_features: int, num_classes: int,
              iid: bool, partition: str, dirichlet_alpha: float, size_skew: float,
              test_fraction: float, seed: int) -> FederatedData:
    """`data=synthetic`: Synthetic(alpha, beta) over `num_clients` clients."""
    _check(partition=partition, num_clients=num_clients, dirichlet_alpha=dirichlet_alpha,
           size_skew=size_skew, test_fraction=test_fraction)
    pop = population(alpha=alpha, beta=beta, num_clients=num_clients, num_features=num_features,
                     num_classes=num_classes, iid=iid, rng=numpy_rng(seed, Stream.PARTITION, _PARAMETERS))
    generated = generate(pop, generator=torch_generator(seed, Stream.PARTITION, _FEATURES))
    if partition == "natural":
        mine = generated
    else:
        pooled = concat(generated)
        rng = numpy_rng(seed, Stream.PARTITION, _REPARTITION)
        parts = _repartition(pooled.labels.numpy(), partition=partition, num_clients=num_clients,
                             dirichlet_alpha=dirichlet_alpha, size_skew=size_skew, rng=rng)
        mine = [pooled[torch.from_numpy(part)] for part in parts]
    # The text sources' split, by position, so both kinds hold out the same share.
    clients = [ClientData(f"synthetic_{k}", *split_by_position(m, test_fraction)) for k, m in enumerate(mine)]
    fingerprint = {
        "source": "synthetic", "alpha": alpha, "beta": beta, "iid": iid,
        "num_features": num_features, "num_classes": num_classes, "partition": partition,
        "test_fraction": test_fraction,
        **({"dirichlet_alpha": dirichlet_alpha} if partition == "dirichlet" else {}),
        **({"size_skew": size_skew} if size_skew else {}),
        "clients": len(clients),
        "train_examples": sum(len(c.train) for c in clients),
        "test_examples": sum(len(c.test) for c in clients),
        "seed": seed,
    }
    return FederatedData(clients, fingerprint,
                         model_dims={"num_features": num_features, "num_classes": num_classes})


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


def _check(*, partition: str, num_clients: int, dirichlet_alpha: float, size_skew: float,
           test_fraction: float) -> None:
    if partition not in PARTITIONS:
        raise FedrunError(f"data.partition: unknown partition '{partition}'; allowed: {', '.join(PARTITIONS)}")
    if num_clients < 1:
        raise FedrunError(f"data.num_clients: must be at least 1, got {num_clients}")
    if partition == "dirichlet" and not dirichlet_alpha > 0:
        raise FedrunError(f"data.dirichlet_alpha: must be > 0, got {dirichlet_alpha}")
    if size_skew < 0 or (size_skew > 0 and partition != "iid"):
        raise FedrunError(f"data.size_skew: must be >= 0 and applies to partition=iid only, "
                          f"got {size_skew} with partition={partition}")
    if not 0 <= test_fraction < 1:
        raise FedrunError(f"data.test_fraction: must be in [0, 1), got {test_fraction}")
