"""Coordinate-wise median of the client updates (Yin et al. 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates"): robust to Byzantine clients."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrun.core import ClientUpdate
from fedrun.strategies import robust
from fedrun.strategies.aggregate import stacked
from fedrun.strategies.server import ServerStrategy


class Median(ServerStrategy):
    needs_individual_updates = True

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        return robust.coordinate_median(stacked(updates))
