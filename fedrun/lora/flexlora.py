"""FlexLoRA (Bai et al., NeurIPS 2024, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources"): the server forms each adapted layer's full update
M = sum_i p_i B_i A_i (p_i: example weights, as FedAvg's) and sends it back as rank-r factors
from its truncated SVD, M ~ U_r S_r V_r^T: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T. A client of a
lower rank (`client.lora_ranks`) starts from those factors truncated to its rank: the SVD's
leading components, its best approximation of M at that rank.

This replaces the strategy's server step (strategy=fedavg only), and needs every client's own
factors: central DP and secure aggregation, which hide them, are refused. Its `lora_agg_error`
is the truncation's relative error ||M - B A||_F / ||M||_F (mean over layers), what the rank-r
factors lose of the exact mean of the clients' products.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrun.core import ClientUpdate
from fedrun.lora.factors import FactorMethod, relative_gap


class FlexLoRA(FactorMethod):
    def server_step(self, previous: torch.Tensor, weights: torch.Tensor,
                    updates: Sequence[ClientUpdate]) -> torch.Tensor:
        """`weights` with every layer's factors replaced by the rank-r SVD of sum_i p_i B_i A_i."""
        if not updates:
            return weights
        p = self.example_weights(updates, previous.device)
        out, errors = weights.clone(), []
        for a_at, a_shape, b_at, b_shape in self.layers:
            full = torch.zeros(b_shape[0], a_shape[1], dtype=torch.float64, device=previous.device)
            for weight, u in zip(p, updates):
                a, b = self.factors(previous, u, a_at, a_shape, b_at, b_shape)
                full += weight * (b @ a)
            b_new, a_new = truncated_factors(full, a_shape[0])
            out[a_at:a_at + a_shape.numel()] = a_new.flatten().to(out.dtype)
            out[b_at:b_at + b_shape.numel()] = b_new.flatten().to(out.dtype)
            errors.append(relative_gap(full, b_new @ a_new))
        self.error = sum(errors) / len(errors)
        return out


def truncated_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B A the best rank-`rank` approximation of `matrix` (Eckart-Young): B = U_r
    sqrt(S_r), A = sqrt(S_r) V_r^T, the singular values split evenly between the factors."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]
