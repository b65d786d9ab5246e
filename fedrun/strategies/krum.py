"""Krum (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent"), or Multi-Krum's mean of the `multi` best-scored updates (El Mhamdi et al. 2018).
A round needs at least 2 num_byzantine + 3 clients (fedrun/checks.py)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.core import ClientUpdate
from fedrun.strategies import robust
from fedrun.strategies.aggregate import stacked
from fedrun.strategies.server import ServerStrategy


class Krum(ServerStrategy):
    needs_individual_updates = True

    def __init__(self, *, num_byzantine: Annotated[int, Range(ge=0)], multi: Annotated[int, Range(ge=1)]):
        super().__init__()
        self.num_byzantine, self.multi = num_byzantine, multi

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        return robust.krum(stacked(updates), num_byzantine=self.num_byzantine, multi=self.multi)
