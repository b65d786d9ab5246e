"""FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data"): the new global model is the average of the client models weighted
by their numbers of training examples, w = sum_i (n_i / n) w_i, i.e. w + sum_i (n_i / n) delta_i.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fedrun.core import ClientUpdate
from fedrun.strategies.aggregate import weighted_mean


class FedAvg:
    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        return weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return weights + delta

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
