"""FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for
Federated Visual Classification"): v <- momentum v + delta; w <- w + server_lr v.

It needs no optimizer of its own: `torch.optim.SGD` with momentum, fed `-delta` as gradient.
"""
from __future__ import annotations

from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.strategies.server import ServerStrategy


class FedAvgM(ServerStrategy):
    """FedAvg with server momentum."""

    secure_sum_weighting = "examples"

    def __init__(self, *, server_lr: Annotated[float, Range(gt=0)], momentum: Annotated[float, Range(ge=0, lt=1)]):
        super().__init__()
        self.server_lr, self.momentum = server_lr, momentum

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.server_lr, momentum=self.momentum)
