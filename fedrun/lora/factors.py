"""The base of the LoRA methods whose server step reads every client's own factors (flora,
flexlora, hetlora): the adapted layers' positions in the flat vector, heterogeneous ranks
(`client.lora_ranks`, fedrun/lora/ranks.py), each client's factors as it ended the round, and
the aggregation error its step measured. Clients hold no weights of their own."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fedrun.core import ClientJob, ClientUpdate, RoundContext
from fedrun.lora.ranks import client_ranks
from fedrun.models.hf import lora_pairs, trainable_offsets
from fedrun.server_model import initial_model


class FactorMethod:
    personal = False  # every client starts from the global factors (truncated to its rank)

    def __init__(self, *, make_model: Callable[[], nn.Module], device: torch.device, seed: int,
                 rank_entries: Sequence[dict] | None = None, num_clients: int = 0):
        model, flat = initial_model(make_model, device, seed)
        self.offsets = trainable_offsets(model)
        # each adapted layer's (A's offset, A's shape (r, in), B's offset, B's shape (out, r))
        self.layers = [(self.offsets[id(a)], a.shape, self.offsets[id(b)], b.shape) for _, a, b in lora_pairs(model)]
        self.initial = flat.detach().clone()
        self.total = flat.numel()
        self.ranks = client_ranks(rank_entries, layers=self.layers, num_clients=num_clients, seed=seed, device=device)
        self.error: float | None = None
        self.setup(model)

    def setup(self, model: nn.Module) -> None:
        """What a method reads of the model besides the factors' positions."""

    def client_job(self, job: ClientJob) -> ClientJob:
        """A client of a lower rank starts from the global factors truncated to it."""
        return job if self.ranks is None else self.ranks.truncate(job, self.total)

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        return update if self.ranks is None else self.ranks.sent_less(update)

    def factors(self, previous: torch.Tensor, update: ClientUpdate, a_at: int, a_shape: torch.Size, b_at: int,
                b_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one layer as the client ended the round (float64): what it started from plus its delta."""
        start = previous if self.ranks is None else self.ranks.start(update.client_id, previous)
        local = start + update.delta
        return (local[a_at:a_at + a_shape.numel()].view(a_shape).double(),
                local[b_at:b_at + b_shape.numel()].view(b_shape).double())

    def example_weights(self, updates: Sequence[ClientUpdate], device: torch.device) -> torch.Tensor:
        """(N,) float64 p_i = n_i / n, FedAvg's weights."""
        n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64, device=device)
        return n / n.sum()

    def aggregation_error(self, previous: torch.Tensor, updates: Sequence[ClientUpdate]) -> float | None:
        error, self.error = self.error, None  # measured by the round's server_step
        return error

    def personal_weights(self, client_id: int, weights: torch.Tensor) -> torch.Tensor:
        return weights

    def save_personal(self, run_dir: Path, *, round_idx: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def relative_gap(exact: torch.Tensor, approximate: torch.Tensor) -> float:
    """||exact - approximate||_F / ||exact||_F (0 when both are 0)."""
    norm = torch.linalg.matrix_norm(exact)
    gap = torch.linalg.matrix_norm(exact - approximate)
    return float(gap / norm) if norm > 0 else (0.0 if gap == 0 else float("inf"))
