"""FLoRA (Wang et al., NeurIPS 2024, "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations"): the server stacks the clients' factors, B = [p_1 B_1 ...
p_n B_n] and A = [A_1; ...; A_n], so that B A = sum_i p_i B_i A_i exactly, and that update (times
LoRA's scaling alpha / r) is merged into the adapted base weights; the adapters restart.

Here the adapted base weights (e.g. GPT-2's c_attn) are part of the global weight vector: they
travel with the adapters but never train (their gradient is zero, fedrun/models/hf.py), and
this method's server step replaces FedAvg's: W <- W + (alpha / r) sum_i p_i B_i A_i (W^T for
GPT-2's Conv1D), then A back to its seeded initial draw and B to 0, which restarts every
adapter at the merged model. Bytes up count the adapters only; bytes down count the previous
round's stacked factors, what a client needs to merge the round it did not see computed (as
FLoRA's clients do; the initial base and the restarted adapters need no transfer). Its
`lora_agg_error` compares the merged change with sum_i p_i B_i A_i: float32 rounding, ~1e-7.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedrun.core import ClientJob, ClientUpdate, RoundContext
from fedrun.lora.factors import FactorMethod, relative_gap
from fedrun.models.hf import lora_layers


@dataclass(frozen=True)
class Base:
    """An adapted layer's base weight: where it is in the flat vector, and how B A maps onto it."""

    at: int
    shape: torch.Size  # (out, in), or (in, out) with fan_in_fan_out (GPT-2's Conv1D)
    transposed: bool
    scaling: float  # LoRA's alpha / r


class FLoRA(FactorMethod):
    def setup(self, model: nn.Module) -> None:
        self.bases = []  # in the order of self.layers (both follow the model's modules)
        for module in lora_layers(model):
            name = next(iter(module.lora_A))
            weight = module.base_layer.weight
            self.bases.append(Base(self.offsets[id(weight)], weight.shape, bool(module.fan_in_fan_out),
                                   float(module.scaling[name])))
        self.base_coords = sum(base.shape.numel() for base in self.bases)
        self.stacked = 0  # coordinates of the last round's stacked factors: what a client downloads

    def client_job(self, job: ClientJob) -> ClientJob:
        job = super().client_job(job)  # its adapters restart truncated to its rank
        job.coords_down = self.stacked
        return job

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        update.bytes_up -= self.base_coords * update.delta.element_size()  # zero: the base never trains
        return super().on_client(update, ctx)

    def server_step(self, previous: torch.Tensor, weights: torch.Tensor,
                    updates: Sequence[ClientUpdate]) -> torch.Tensor:
        """The stacked update merged into the base, the adapters restarted (the strategy's mean is unused)."""
        if not updates:
            return weights
        p = self.example_weights(updates, previous.device)
        out, errors = previous.clone(), []
        for layer, base in zip(self.layers, self.bases):
            a_at, a_shape, b_at, b_shape = layer
            product = torch.zeros(b_shape[0], a_shape[1], dtype=torch.float64, device=previous.device)
            for weight, u in zip(p, updates):
                a, b = self.factors(previous, u, *layer)
                product += weight * (b @ a)
            exact = product.T if base.transposed else product
            w = slice(base.at, base.at + base.shape.numel())
            out[w] = (previous[w].double() + base.scaling * exact.flatten()).to(out.dtype)
            merged = (out[w].double() - previous[w].double()).view(base.shape) / base.scaling
            errors.append(relative_gap(exact, merged))
            for at, shape in ((a_at, a_shape), (b_at, b_shape)):  # the adapters restart: A its first draw, B = 0
                out[at:at + shape.numel()] = self.initial[at:at + shape.numel()]
        self.error = sum(errors) / len(errors)
        per_rank = sum(a_shape[1] + b_shape[0] for _, a_shape, _, b_shape in self.layers)  # in + out, every layer
        full = self.layers[0][1][0]
        self.stacked = per_rank * sum(full if self.ranks is None else self.ranks.rank(u.client_id) for u in updates)
        return out

    def state_dict(self) -> dict:
        return {"stacked": self.stacked}

    def load_state_dict(self, state: dict) -> None:
        self.stacked = int(state["stacked"])
