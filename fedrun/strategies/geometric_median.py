"""Geometric median of the client updates: RFA, "Robust Aggregation for Federated Learning"
(Pillutla, Kakade & Harchaoui, IEEE TSP 2022). The aggregate minimises sum_i alpha_i ||v - w_i||
(alpha_i the clients' example shares), which a minority of arbitrary updates cannot drag far;
the smoothed Weiszfeld algorithm approximates it in a few iterations, each a weighted mean.

This file and conf/strategy/geometric_median.yaml are the whole strategy: the worked example
of docs/extending.md.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.core import ClientUpdate
from fedrun.strategies.aggregate import stacked
from fedrun.strategies.server import ServerStrategy


class GeometricMedian(ServerStrategy):
    needs_individual_updates = True  # DP noise and secure aggregation hide what it must see

    def __init__(self, *, iterations: Annotated[int, Range(ge=1)], smoothing: Annotated[float, Range(gt=0)]):
        super().__init__()
        self.iterations, self.smoothing = iterations, smoothing

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        return geometric_median(stacked(updates), weights, iterations=self.iterations, smoothing=self.smoothing)


def geometric_median(points: torch.Tensor, weights: torch.Tensor, *, iterations: int,
                     smoothing: float) -> torch.Tensor:
    """RFA's smoothed Weiszfeld (Pillutla et al. 2022, Algorithm 2): from the weighted mean v,
    `iterations` times set beta_i = alpha_i / max(nu, ||v - w_i||) and v = sum beta_i w_i / sum beta_i.
    `points` is (K, D), `weights` (K,) the alpha_i; nu (`smoothing`) keeps a point at v finite."""
    alpha = weights.to(points) / weights.sum()
    median = alpha @ points
    for _ in range(iterations):
        distance = torch.linalg.vector_norm(points - median, dim=1)
        beta = alpha / distance.clamp(min=smoothing)
        median = (beta / beta.sum()) @ points
    return median
