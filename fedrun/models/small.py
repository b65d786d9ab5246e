"""Small classifiers for feature-vector data such as Synthetic(alpha, beta).

`LogReg` is the multinomial logistic regression that FedProx (Li et al. 2020, "Federated
Optimization in Heterogeneous Networks") trains on its synthetic data; `MLP` adds one
hidden ReLU layer, a small non-convex counterpart. Both map (B, F) features to (B, C)
logits; the loss applies the softmax.
"""
from __future__ import annotations

from typing import Annotated

import torch
from torch import nn

from fedrun.components import Range


class LogReg(nn.Module):
    elementwise_forward = True  # linear layers and elementwise ops: backend=vectorized may group its matmuls

    def __init__(self, *, num_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, C) logits."""
        return self.linear(x)


class MLP(nn.Module):
    elementwise_forward = True

    def __init__(self, *, num_features: int, num_classes: int, hidden: Annotated[int, Range(ge=1)]):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, hidden) -> (B, C) logits."""
        return self.net(x)
