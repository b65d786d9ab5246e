"""FlexLoRA (Bai et al., NeurIPS 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources"): the server forms each adapted layer's full update
M = sum_i p_i B_i A_i (p_i: example weights, as FedAvg's) and sends it back as rank-r factors
from its truncated SVD, M ~ U_r S_r V_r^T: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T.

This replaces the strategy's server step (strategy=fedavg only), and needs every client's own
factors: central DP and secure aggregation, which hide them, are refused. Its `lora_agg_error`
is the truncation's relative error ||M - B A||_F / ||M||_F (mean over layers), what the rank-r
factors lose of the exact mean of the clients' products.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from fedrun.core import ClientJob, ClientUpdate, RoundContext
from fedrun.lora.ranks import client_ranks
from fedrun.models.hf import lora_pairs, trainable_offsets
from fedrun.server_model import initial_model


class FlexLoRA:
    personal = False  # every client starts from the global factors

    def __init__(self, *, make_model: Callable[[], nn.Module], device: torch.device, seed: int,
                 rank_entries: Sequence[dict] | None = None, num_clients: int = 0):
        model, flat = initial_model(make_model, device, seed)
        offsets = trainable_offsets(model)
        self.layers = [(offsets[id(a)], a.shape, offsets[id(b)], b.shape) for _, a, b in lora_pairs(model)]
        self.total = flat.numel()
        self.ranks = client_ranks(rank_entries, layers=self.layers, num_clients=num_clients, seed=seed, device=device)
        self.error: float | None = None

    def client_job(self, job: ClientJob) -> ClientJob:
        """A client of a lower rank starts from the global SVD factors truncated to it: its best
        approximation of the global product at that rank."""
        return job if self.ranks is None else self.ranks.truncate(job, self.total)

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        return update if self.ranks is None else self.ranks.sent_less(update)

    def server_step(self, previous: torch.Tensor, weights: torch.Tensor,
                    updates: Sequence[ClientUpdate]) -> torch.Tensor:
        """`weights` with every layer's factors replaced by the rank-r SVD of sum_i p_i B_i A_i."""
        if not updates:
            return weights
        p = torch.tensor([u.num_examples for u in updates], dtype=torch.float64, device=previous.device)
        p = p / p.sum()
        out, errors = weights.clone(), []
        for a_at, a_shape, b_at, b_shape in self.layers:
            full = torch.zeros(b_shape[0], a_shape[1], dtype=torch.float64, device=previous.device)
            for weight, u in zip(p, updates):
                local = (previous if self.ranks is None else self.ranks.start(u.client_id, previous)) + u.delta
                a = local[a_at:a_at + a_shape.numel()].view(a_shape).double()
                b = local[b_at:b_at + b_shape.numel()].view(b_shape).double()
                full += weight * (b @ a)
            b_new, a_new = truncated_factors(full, a_shape[0])
            out[a_at:a_at + a_shape.numel()] = a_new.flatten().to(out.dtype)
            out[b_at:b_at + b_shape.numel()] = b_new.flatten().to(out.dtype)
            norm = torch.linalg.matrix_norm(full)
            errors.append(float(torch.linalg.matrix_norm(full - b_new @ a_new) / norm) if norm > 0 else 0.0)
        self.error = sum(errors) / len(errors)
        return out

    def aggregation_error(self, previous: torch.Tensor, updates: Sequence[ClientUpdate]) -> float | None:
        error, self.error = self.error, None
        return error

    def personal_weights(self, client_id: int, weights: torch.Tensor) -> torch.Tensor:
        return weights

    def save_personal(self, run_dir: Path, *, round_idx: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-`rank` approximation of `matrix` (Eckart-Young): B = U_r
    sqrt(S_r), A = sqrt(S_r) V_r^T, the singular values split evenly between the factors."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]
