"""Aggregators: pure functions from client deltas to one delta."""
from __future__ import annotations

from typing import Sequence

import torch


def weighted_mean(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i (w_i / sum_j w_j) * delta_i, accumulated in float64 and returned as float32."""
    total = float(sum(weights))
    if not deltas or total <= 0:
        raise ValueError("weighted_mean needs at least one delta with a positive weight")
    acc = torch.zeros_like(deltas[0], dtype=torch.float64)
    for delta, w in zip(deltas, weights):
        acc.add_(delta, alpha=w / total)
    return acc.to(deltas[0].dtype)
