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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedrun.core import ClientJob, ClientUpdate, RoundContext
from fedrun.lora.ranks import client_ranks
from fedrun.models.hf import lora_layers, trainable_offsets
from fedrun.server_model import initial_model


@dataclass(frozen=True)
class Layer:
    a_at: int
    a_shape: torch.Size  # (r, in)
    b_at: int
    b_shape: torch.Size  # (out, r)
    w_at: int
    w_shape: torch.Size  # (out, in), or (in, out) with fan_in_fan_out (GPT-2's Conv1D)
    transposed: bool
    scaling: float


class FLoRA:
    personal = False

    def __init__(self, *, make_model: Callable[[], nn.Module], device: torch.device, seed: int,
                 rank_entries: Sequence[dict] | None = None, num_clients: int = 0):
        model, flat = initial_model(make_model, device, seed)
        offsets = trainable_offsets(model)
        self.layers = []
        for module in lora_layers(model):
            (name, a), b = next(iter(module.lora_A.items())), next(iter(module.lora_B.values()))
            weight = module.base_layer.weight
            self.layers.append(Layer(offsets[id(a.weight)], a.weight.shape, offsets[id(b.weight)], b.weight.shape,
                                     offsets[id(weight)], weight.shape, bool(module.fan_in_fan_out),
                                     float(module.scaling[name])))
        self.initial = flat.detach().clone()  # the adapters' restart values: A's seeded draw, B = 0
        self.total = flat.numel()
        self.ranks = client_ranks(rank_entries, layers=[(x.a_at, x.a_shape, x.b_at, x.b_shape) for x in self.layers],
                                  num_clients=num_clients, seed=seed, device=device)
        self.base_coords = sum(layer.w_shape.numel() for layer in self.layers)
        self.stacked = 0  # coordinates of the last round's stacked factors: what a client downloads
        self.error: float | None = None

    def client_job(self, job: ClientJob) -> ClientJob:
        if self.ranks is not None:  # its adapters restart truncated to its rank
            job = self.ranks.truncate(job, self.total)
        job.coords_down = self.stacked
        return job

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        update.bytes_up -= self.base_coords * update.delta.element_size()  # zero: the base never trains
        return update if self.ranks is None else self.ranks.sent_less(update)

    def server_step(self, previous: torch.Tensor, weights: torch.Tensor,
                    updates: Sequence[ClientUpdate]) -> torch.Tensor:
        """The stacked update merged into the base, the adapters restarted (the strategy's mean is unused)."""
        if not updates:
            return weights
        p = torch.tensor([u.num_examples for u in updates], dtype=torch.float64, device=previous.device)
        p = p / p.sum()
        out, errors = previous.clone(), []
        for layer in self.layers:
            product = torch.zeros(layer.b_shape[0], layer.a_shape[1], dtype=torch.float64, device=previous.device)
            for weight, u in zip(p, updates):
                local = (previous if self.ranks is None else self.ranks.start(u.client_id, previous)) + u.delta
                a = local[layer.a_at:layer.a_at + layer.a_shape.numel()].view(layer.a_shape).double()
                b = local[layer.b_at:layer.b_at + layer.b_shape.numel()].view(layer.b_shape).double()
                product += weight * (b @ a)
            change = layer.scaling * (product.T if layer.transposed else product)
            w = slice(layer.w_at, layer.w_at + layer.w_shape.numel())
            out[w] = (previous[w].double() + change.flatten()).to(out.dtype)
            merged = (out[w].double() - previous[w].double()).view(layer.w_shape) / layer.scaling
            exact = product.T if layer.transposed else product
            norm = torch.linalg.matrix_norm(exact)
            errors.append(float(torch.linalg.matrix_norm(merged - exact) / norm) if norm > 0 else 0.0)
            for at, shape in ((layer.a_at, layer.a_shape), (layer.b_at, layer.b_shape)):
                out[at:at + shape.numel()] = self.initial[at:at + shape.numel()]
        self.error = sum(errors) / len(errors)
        per_rank = sum(layer.a_shape[1] + layer.b_shape[0] for layer in self.layers)  # in + out, every layer
        self.stacked = per_rank * sum(self.layers[0].a_shape[0] if self.ranks is None else self.ranks.rank(u.client_id)
                                      for u in updates)
        return out

    def aggregation_error(self, previous: torch.Tensor, updates: Sequence[ClientUpdate]) -> float | None:
        error, self.error = self.error, None
        return error

    def personal_weights(self, client_id: int, weights: torch.Tensor) -> torch.Tensor:
        return weights

    def save_personal(self, run_dir: Path, *, round_idx: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"stacked": self.stacked}

    def load_state_dict(self, state: dict) -> None:
        self.stacked = int(state["stacked"])
