"""Aggregators: pure functions from client deltas to one delta."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrun.core import ClientUpdate


def weighted_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i (w_i / sum_j w_j) * delta_i, accumulated in float64 and returned as float32."""
    total = float(sum(weights))
    if not deltas or total <= 0:
        raise ValueError("weighted_mean needs at least one delta with a positive weight")
    acc = torch.zeros_like(deltas[0], dtype=torch.float64)
    for delta, w in zip(deltas, weights):
        acc.add_(delta, alpha=w / total)
    return acc.to(deltas[0].dtype)


def example_weighted(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """FedAvg's aggregate: the clients' deltas weighted by their numbers of training examples."""
    return weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])


def stacked(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """(K, D) the clients' deltas, row k client k's: what the robust rules (robust.py) take."""
    return torch.stack([u.delta for u in updates])
