"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg whose
clients minimise f_i(w) + (mu / 2) ||w - w_global||^2, i.e. add mu (w - w_global) to every
local gradient. The server half is FedAvg's."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.core import ClientJob, GradientTerm
from fedrun.strategies.server import ServerStrategy


class ProximalTerm:
    """FedProx's client side: the gradient of (mu / 2) ||w - w_global||^2; nothing sent back."""

    def __init__(self, mu: float):
        self.mu = mu

    def gradient_term(self, jobs: Sequence[ClientJob], weights: torch.Tensor) -> GradientTerm | None:
        if not self.mu:  # mu = 0 is FedAvg exactly: no term at all
            return None
        mu = self.mu

        def term(grad: torch.Tensor, rows: torch.Tensor) -> None:
            grad.add_((rows - weights) * mu)  # every row starts from the same global weights

        return term

    def client_extras(self, job: ClientJob, delta: torch.Tensor, *, steps: int, lr: float) -> dict[str, torch.Tensor]:
        return {}


class FedProx(ServerStrategy):
    secure_sum_weighting = "examples"

    def __init__(self, *, mu: Annotated[float, Range(ge=0)]):
        super().__init__()
        self.local_rule = ProximalTerm(mu)
