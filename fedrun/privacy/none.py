"""`privacy=none`: updates and aggregates pass through unchanged."""
from __future__ import annotations

import torch

from fedrun.core import ClientUpdate, RoundContext


class NoPrivacy:
    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        return update

    def on_aggregate(self, delta: torch.Tensor, ctx: RoundContext) -> torch.Tensor:
        return delta
