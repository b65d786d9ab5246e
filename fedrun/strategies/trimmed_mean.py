"""Coordinate-wise trimmed mean (Yin et al. 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates"): the `trim` fraction of the values cut at each side."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.core import ClientUpdate
from fedrun.strategies import robust
from fedrun.strategies.aggregate import stacked
from fedrun.strategies.server import ServerStrategy


class TrimmedMean(ServerStrategy):
    needs_individual_updates = True

    def __init__(self, *, trim: Annotated[float, Range(ge=0, lt=0.5)]):
        super().__init__()
        self.trim = trim

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        return robust.trimmed_mean(stacked(updates), trim=self.trim)
