"""HetLoRA (Cho et al., EMNLP 2024, "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models"): clients of different ranks (`client.lora_ranks`) train the global factors
truncated to their rank (fedrun/lora/ranks.py); the server zero-pads every client's factors to
the full rank and averages them with sparsity weights, p_i proportional to ||B_i A_i||_F (per
layer: a client whose update says more counts more), which replaces FedAvg's step.

Rank self-pruning (the paper's optional shrinking of a client's rank) is not built. Its
`lora_agg_error` is ||sum_i p_i B_i A_i - (sum_i p_i B_i)(sum_i p_i A_i)||_F / ||sum_i p_i B_i A_i||_F
(mean over layers), the gap between the weighted mean product and the product of the means.
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


class HetLoRA:
    personal = False

    def __init__(self, *, make_model: Callable[[], nn.Module], device: torch.device, seed: int,
                 rank_entries: Sequence[dict] | None = None, num_clients: int = 0):
        model, flat = initial_model(make_model, device, seed)
        offsets = trainable_offsets(model)
        self.layers = [(offsets[id(a)], a.shape, offsets[id(b)], b.shape) for _, a, b in lora_pairs(model)]
        self.total = flat.numel()
        self.ranks = client_ranks(rank_entries, layers=self.layers, num_clients=num_clients, seed=seed, device=device)
        self.error: float | None = None

    def client_job(self, job: ClientJob) -> ClientJob:
        return job if self.ranks is None else self.ranks.truncate(job, self.total)

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        return update if self.ranks is None else self.ranks.sent_less(update)

    def server_step(self, previous: torch.Tensor, weights: torch.Tensor,
                    updates: Sequence[ClientUpdate]) -> torch.Tensor:
        if not updates:
            return weights
        out, errors = weights.clone(), []
        for a_at, a_shape, b_at, b_shape in self.layers:
            a_i, b_i = [], []
            for u in updates:  # each client's own factors: zero beyond its rank (zero-padded)
                start = previous if self.ranks is None else self.ranks.start(u.client_id, previous)
                local = start + u.delta
                a_i.append(local[a_at:a_at + a_shape.numel()].view(a_shape).double())
                b_i.append(local[b_at:b_at + b_shape.numel()].view(b_shape).double())
            products = [b @ a for a, b in zip(a_i, b_i)]
            norms = torch.stack([torch.linalg.matrix_norm(p) for p in products])
            p = norms / norms.sum() if norms.sum() > 0 else torch.full_like(norms, 1 / len(norms))
            a_mean = sum(w * a for w, a in zip(p, a_i))
            b_mean = sum(w * b for w, b in zip(p, b_i))
            exact = sum(w * prod for w, prod in zip(p, products))
            out[a_at:a_at + a_shape.numel()] = a_mean.flatten().to(out.dtype)
            out[b_at:b_at + b_shape.numel()] = b_mean.flatten().to(out.dtype)
            norm = torch.linalg.matrix_norm(exact)
            errors.append(float(torch.linalg.matrix_norm(exact - b_mean @ a_mean) / norm) if norm > 0 else 0.0)
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
