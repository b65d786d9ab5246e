"""Partitioners: which client holds which example.

Each returns one index array per client; every example lands in exactly one client, and
the only randomness is the `rng` passed in. Where a partitioner groups examples (by label
or by shard) it returns each client's indices in random order, so that a split by
position into train and test is a random split.
The natural split (one client per speaker, module or generating distribution) comes
from the data source itself.

- `iid`: shuffle and deal out evenly.
- `dirichlet`: label skew; each class is spread over the clients with proportions drawn
  from Dir(alpha) (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification"; per-class form of Yurochkin et al.
  2019 and Li et al. 2022, "Federated Learning on Non-IID Data Silos").
- `shards`: sort by label, cut into equal shards, a few shards per client (McMahan et al.
  2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data").
- `power_law_sizes` + `split_by_sizes`: quantity skew, client sizes following a power law.
"""
from __future__ import annotations

import numpy as np


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle the examples and deal them out evenly: client sizes differ by at most one."""
    return np.array_split(rng.permutation(num_examples), num_clients)


def dirichlet(labels: np.ndarray, num_clients: int, *, alpha: float,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Label skew: each class's examples go to clients in proportions p ~ Dir(alpha * 1).

    Small alpha gives each client few classes, large alpha approaches an iid split.
    A client left empty receives one example drawn at random from the others' spare
    examples (never a donor's last one). We prefer this to the usual "redraw until every
    client has min_size examples" loop, which is unbounded and, with many clients and
    small alpha, practically never ends; moving one example per empty client is bounded
    and changes the label distributions least.
    """
    labels = np.asarray(labels)
    _check_enough(len(labels), num_clients)
    owner = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        # Cut the class at the rounded cumulative proportions (the usual per-class split).
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        owner[members] = np.searchsorted(cuts, np.arange(len(members)), side="right")
    _fill_empty(owner, num_clients, rng)
    return _group(owner, num_clients, rng)


def shards(labels: np.ndarray, num_clients: int, *, shards_per_client: int = 2,
           rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al.'s pathological non-iid split: label-sorted shards, a few per client.

    The examples are sorted by label (ties in random order), cut into
    `num_clients * shards_per_client` shards whose sizes differ by at most one, and each
    client gets `shards_per_client` shards chosen at random.
    """
    labels = np.asarray(labels)
    num_shards = num_clients * shards_per_client
    _check_enough(len(labels), num_shards, what="shards")
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shard_of = np.empty(len(labels), dtype=np.int64)
    for shard, members in enumerate(np.array_split(by_label, num_shards)):
        shard_of[members] = shard
    client_of_shard = rng.permutation(num_shards) // shards_per_client
    return _group(client_of_shard[shard_of], num_clients, rng)


def power_law_sizes(num_examples: int, num_clients: int, *, exponent: float,
                    rng: np.random.Generator) -> np.ndarray:
    """(num_clients,) int64 sizes: rank r gets a share proportional to r^-exponent.

    Every client gets one example, the rest are shared by largest-remainder rounding so the
    sizes sum to `num_examples` exactly; the ranks are then shuffled over the clients.
    Exponent 0 gives equal sizes (differing by at most one).
    """
    _check_enough(num_examples, num_clients)
    weights = np.arange(1, num_clients + 1, dtype=np.float64) ** -float(exponent)
    quotas = weights / weights.sum() * (num_examples - num_clients)
    sizes = np.floor(quotas).astype(np.int64)
    leftover = num_examples - num_clients - int(sizes.sum())
    sizes[np.argsort(sizes - quotas, kind="stable")[:leftover]] += 1
    return rng.permutation(sizes + 1)


def split_by_sizes(order: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    """Consecutive runs of `order`, of the given sizes (which must sum to its length)."""
    sizes = np.asarray(sizes)
    if sizes.sum() != len(order):
        raise ValueError(f"sizes sum to {sizes.sum()}, not to the {len(order)} examples")
    return np.split(np.asarray(order), np.cumsum(sizes)[:-1])


def _check_enough(num_examples: int, num_parts: int, *, what: str = "clients") -> None:
    if num_parts < 1 or num_examples < num_parts:
        raise ValueError(f"cannot split {num_examples} examples into {num_parts} non-empty {what}")


def _fill_empty(owner: np.ndarray, num_clients: int, rng: np.random.Generator) -> None:
    """Give each client without examples one example that its owner can spare (in place)."""
    empty = np.flatnonzero(np.bincount(owner, minlength=num_clients) == 0)
    if empty.size == 0:
        return
    order = rng.permutation(len(owner))
    # Each client keeps its first example in a random order; all its others are spare.
    _, kept = np.unique(owner[order], return_index=True)
    spare = np.delete(order, kept)
    owner[rng.choice(spare, size=empty.size, replace=False)] = empty


def _group(owner: np.ndarray, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of each client's examples, in random order within the client."""
    shuffled = rng.permutation(len(owner))
    grouped = shuffled[np.argsort(owner[shuffled], kind="stable")]
    return split_by_sizes(grouped, np.bincount(owner, minlength=num_clients))
