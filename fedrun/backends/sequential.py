"""`backend=sequential`: the round's clients train one after another on one reused model."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedrun.backends.hooks import apply_client_hooks
from fedrun.client import LocalTrainer
from fedrun.core import ClientHook, ClientJob, ClientUpdate, RoundContext
from fedrun.data.examples import FederatedData


class SequentialBackend:
    def __init__(self, *, make_trainer: Callable[[], LocalTrainer], data: FederatedData,
                 client_hooks: Sequence[ClientHook]):
        self.trainer = make_trainer()
        self.data = data
        self.client_hooks = client_hooks

    def train_cohort(self, weights: torch.Tensor, jobs: Sequence[ClientJob],
                     ctx: RoundContext) -> list[ClientUpdate]:
        return [self.train_client(job, weights, ctx) for job in jobs]

    def train_client(self, job: ClientJob, weights: torch.Tensor, ctx: RoundContext) -> ClientUpdate:
        update = self.trainer.train(job, self.data.clients[job.client_id], weights, ctx)
        # Client-side hooks (an attack, then privacy) act before anything leaves the client.
        return apply_client_hooks(update, self.client_hooks, ctx)

    def close(self) -> None:
        """Nothing to release: the trainer lives in this process."""
