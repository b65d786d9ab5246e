"""How a federated data set is spread over its clients: sizes and label skew.

Label skew is summarised by Shannon entropy in bits: the mean over clients of each
client's label entropy, next to the entropy of all labels pooled. The mean is close to
the pooled entropy for an iid split and falls further below it the more each client's
labels concentrate on few classes (Dirichlet with small alpha, shards).
"""
from __future__ import annotations

import numpy as np
import torch

from fedrun.data.examples import FederatedData, Labelled


def partition_stats(data: FederatedData) -> dict:
    """Client count, training examples per client, and label entropies for labelled data."""
    sizes = np.array([len(c.train) for c in data.clients])
    stats = {
        "clients": data.num_clients,
        "train_min": int(sizes.min()),
        "train_median": float(np.median(sizes)),
        "train_max": int(sizes.max()),
        "train_total": int(sizes.sum()),
    }
    if data.clients and all(isinstance(c.train, Labelled) for c in data.clients):
        per_client = [c.train.labels for c in data.clients if isinstance(c.train, Labelled) and len(c.train)]
        stats["label_entropy_mean_bits"] = float(np.mean([label_entropy(y) for y in per_client]))
        stats["label_entropy_pooled_bits"] = label_entropy(torch.cat(per_client))
    return stats


def label_entropy(labels: torch.Tensor) -> float:
    """Entropy in bits of the empirical distribution of integer labels."""
    counts = torch.bincount(labels.long()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())
