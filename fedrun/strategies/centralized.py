"""strategy=centralized: the baseline in which all the clients' training data is pooled and one
model trains on it, as a data centre would (the "centralised" row of federated papers).

Each round it takes as many optimizer steps as the round's cohort would take in all under
federated training (the sum of each reporting client's local steps, stragglers included),
with the client optimizer and batch size, on mini-batches of the pooled training data drawn
from the stream of a client id past the population (`Stream.CLIENT`, round, N). The optimizer
restarts each round, as a client's does. The model is evaluated on the same test set as any
other strategy. It trains in the main process (backend=sequential); nothing is sent, so bytes
are 0, and clients.csv has one row a round, client_id N (the pooled data).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedrun.client import LocalTrainer
from fedrun.client_config import ClientConfig
from fedrun.core import ClientJob, ClientUpdate, RoundContext, Stream, torch_generator
from fedrun.data.examples import ClientData, FederatedData, PackedClients, concat
from fedrun.strategies.server import ServerStrategy


class Centralized(ServerStrategy):
    trains_centrally = True  # trains the round itself (train_cohort), not through the backend

    def __init__(self, *, data: FederatedData, make_model: Callable[[], nn.Module], client_config: ClientConfig,
                 device: torch.device):
        super().__init__()
        clients = data.clients
        train = clients.train if isinstance(clients, PackedClients) else concat([c.train for c in clients])
        self.pooled = ClientData("pooled", train, train[:0])
        self.pooled_id = data.num_clients  # past the population: its own batch stream
        self.sizes = data.client_sizes()
        self.client_config = client_config
        self.trainer = LocalTrainer(make_model, client_config, device)

    def client_job(self, client_id: int) -> ClientJob:
        return ClientJob(client_id=client_id, coords_down=0)  # its data is pooled: nothing goes down

    def cohort_steps(self, cohort: Sequence[int], ctx: RoundContext) -> int:
        """The local steps the cohort's clients would take in all this round."""
        return sum(self.client_config.num_steps(int(self.sizes[k]), torch_generator(ctx.seed, Stream.CLIENT,
                                                                                    ctx.round_idx, k))
                   for k in cohort)

    def train_cohort(self, weights: torch.Tensor, jobs: Sequence[ClientJob], ctx: RoundContext) -> list[ClientUpdate]:
        """One update: the pooled model after the cohort's steps, minus `weights`."""
        steps = self.cohort_steps([job.client_id for job in jobs], ctx)
        self.trainer.cfg = dataclasses.replace(self.client_config, local_steps=steps, local_epochs=None,
                                               local_steps_min=None, local_steps_max=None)
        update = self.trainer.train(ClientJob(self.pooled_id), self.pooled, weights, ctx)
        update.bytes_up = 0  # nothing is sent: the data is already in one place
        return [update]
