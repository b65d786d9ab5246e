"""Heterogeneous LoRA ranks (`client.lora_ranks`): clients hold adapters of different ranks, by
fraction, as `client.models` assigns architectures (a seeded permutation cut into blocks).

The adapters are built at the largest rank (model.lora.r). A client of rank r starts from the
global factors truncated to r (A's rows and B's columns from r on set to 0, as its own
coordinates) and keeps them at 0: with both zero, their gradients are zero too, so plain local
training never moves them. It sends, and is sent, only its r(in + out) coordinates per layer.
How the server combines the mixed-rank factors is the LoRA method's: flexlora's SVD truncation,
flora's stacking, hetlora's zero-padded average.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrun.core import ClientJob, ClientUpdate, OwnCoordinates
from fedrun.strategies.client_models import assign_architectures

Layers = Sequence[tuple[int, torch.Size, int, torch.Size]]  # (A's offset, A's shape, B's offset, B's shape)


def client_ranks(entries: Sequence[dict] | None, *, layers: Layers, num_clients: int, seed: int,
                 device: torch.device) -> ClientRanks | None:
    return None if entries is None else ClientRanks(entries, layers=layers, num_clients=num_clients, seed=seed,
                                                    device=device)


class ClientRanks:
    def __init__(self, entries: Sequence[dict], *, layers: Sequence[tuple[int, torch.Size, int, torch.Size]],
                 num_clients: int, seed: int, device: torch.device):
        """`layers`: each adapted layer's (A's offset, A's shape (r, in), B's offset, B's shape (out, r))."""
        self.ranks = [int(e["rank"]) for e in entries]
        which = assign_architectures([float(e["fraction"]) for e in entries], num_clients=num_clients, seed=seed, key=1)
        self.rank_of = [self.ranks[k] for k in which.tolist()]
        self.full = int(layers[0][1][0])  # the adapters' built rank
        self.beyond = {r: _beyond(r, layers, device) for r in set(self.ranks) if r < self.full}

    def rank(self, client_id: int) -> int:
        return self.rank_of[client_id]

    def start(self, client_id: int, weights: torch.Tensor) -> torch.Tensor:
        """What the client starts from: the global factors truncated to its rank."""
        index = self.beyond.get(self.rank_of[client_id])
        return weights if index is None else weights.index_fill(0, index.to(weights.device), 0)

    def truncate(self, job: ClientJob, total: int) -> ClientJob:
        """The job of a client whose rank is below the built one: the global factors truncated to it."""
        index = self.beyond.get(self.rank_of[job.client_id])
        if index is not None:
            job.own = OwnCoordinates(torch.zeros(len(index), device=index.device), index)
            job.coords_down = (total if job.coords_down is None else job.coords_down) - len(index)
        return job

    def sent_less(self, update: ClientUpdate) -> ClientUpdate:
        """Its update's truncated coordinates are zero and are not sent."""
        index = self.beyond.get(self.rank_of[update.client_id])
        if index is not None:
            update.bytes_up -= len(index) * update.delta.element_size()
        return update


def _beyond(rank: int, layers: Sequence[tuple[int, torch.Size, int, torch.Size]], device: torch.device) -> torch.Tensor:
    """Positions of A's rows and B's columns from `rank` on, in every layer."""
    parts = []
    for a_at, a_shape, b_at, b_shape in layers:
        full, fan_in = a_shape
        parts.append(a_at + torch.arange(rank * fan_in, full * fan_in, device=device))  # A (r, in): rows >= rank
        columns = torch.arange(b_shape[0], device=device)[:, None] * full + torch.arange(rank, full, device=device)
        parts.append(b_at + columns.flatten())  # B (out, r): columns >= rank
    return torch.cat(parts)
