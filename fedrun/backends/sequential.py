"""`backend=sequential`: the round's clients train one after another on one reused model."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fedrun.client import LocalTrainer
from fedrun.core import ClientUpdate, Mechanism, RoundContext
from fedrun.data.examples import FederatedData


class SequentialBackend:
    def __init__(self, *, make_trainer: Callable[[], LocalTrainer], data: FederatedData,
                 mechanism: Mechanism):
        self.trainer = make_trainer()
        self.data = data
        self.mechanism = mechanism

    def train_cohort(self, weights: torch.Tensor, cohort: Sequence[int],
                     ctx: RoundContext) -> list[ClientUpdate]:
        # The mechanism's client hook runs here, on the client side, before anything is sent.
        return [
            self.mechanism.on_client(self.trainer.train(cid, self.data.clients[cid], weights, ctx), ctx)
            for cid in cohort
        ]
