"""`privacy=none`: updates are combined by the strategy, unchanged; nothing is accounted."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrun.core import ClientUpdate, RoundContext, Strategy
from fedrun.privacy.accounting import DPEvent


class NoPrivacy:
    metric_columns: list[str] = []

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        return update

    def allows_round(self, ctx: RoundContext) -> bool:
        return True

    def begin_round(self, ctx: RoundContext) -> None:
        pass

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: RoundContext, strategy: Strategy) -> torch.Tensor | None:
        return strategy.aggregate(updates) if updates else None

    def round_metrics(self, *, tight: bool) -> dict[str, float | None]:
        return {}

    def summary(self) -> dict:
        return {"mechanism": "none"}

    def round_events(self, round_idx: int) -> list[DPEvent]:
        return []

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
