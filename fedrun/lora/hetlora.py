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

from collections.abc import Sequence

import torch

from fedrun.core import ClientUpdate
from fedrun.lora.factors import FactorMethod, relative_gap


class HetLoRA(FactorMethod):
    def server_step(self, previous: torch.Tensor, weights: torch.Tensor,
                    updates: Sequence[ClientUpdate]) -> torch.Tensor:
        if not updates:
            return weights
        out, errors = weights.clone(), []
        for layer in self.layers:
            a_at, a_shape, b_at, b_shape = layer
            a_i, b_i = zip(*(self.factors(previous, u, *layer) for u in updates))  # zero past each client's rank
            products = [b @ a for a, b in zip(a_i, b_i)]
            norms = torch.stack([torch.linalg.matrix_norm(p) for p in products])
            p = norms / norms.sum() if norms.sum() > 0 else torch.full_like(norms, 1 / len(norms))
            a_mean = sum(w * a for w, a in zip(p, a_i))
            b_mean = sum(w * b for w, b in zip(p, b_i))
            out[a_at:a_at + a_shape.numel()] = a_mean.flatten().to(out.dtype)
            out[b_at:b_at + b_shape.numel()] = b_mean.flatten().to(out.dtype)
            errors.append(relative_gap(sum(w * prod for w, prod in zip(p, products)), b_mean @ a_mean))
        self.error = sum(errors) / len(errors)
        return out
