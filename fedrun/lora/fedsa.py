"""FedSA-LoRA (Guo et al., ICLR 2025, "Selective Aggregation for Low-Rank Adaptation in Federated
Learning"): the A factors learn what clients share and are aggregated; the B factors learn what
is each client's own and never leave it.

A client starts each round from the global A and its own B (the initial B = 0 before its first
round); after training it keeps its new B (client-side state, simulated in one dict and
checkpointed) and sends its update with the B coordinates zeroed, so the strategy averages A
alone, and only A's coordinates count in bytes up and down. Each client is evaluated with its
own B (the run's eval metrics pool every client's test examples so; `eval.per_client` lists
them). Its `lora_agg_error` is the mean over clients and layers of
||B_i A_i - B_i mean(A)||_F / ||B_i A_i||_F: what a client's product loses when its A is
replaced by the example-weighted mean of the round's A factors.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fedrun.core import ClientJob, ClientUpdate, OwnCoordinates, RoundContext
from fedrun.models.hf import lora_pairs, trainable_offsets
from fedrun.rundir import atomic_write
from fedrun.server_model import initial_model

OWN_B_FILE = "client_lora_b.safetensors"


class FedSA:
    personal = True  # each client evaluates with its own B
    def __init__(self, *, make_model: Callable[[], nn.Module], device: torch.device, seed: int):
        model, flat = initial_model(make_model, device, seed)
        offsets = trainable_offsets(model)
        # (A's, B's) positions and shapes in the flat vector, per adapted layer
        self.layers = [((offsets[id(a)], a.shape), (offsets[id(b)], b.shape)) for _, a, b in lora_pairs(model)]
        self.b_index = torch.cat([torch.arange(o, o + s.numel(), device=device) for _, (o, s) in self.layers])
        self.initial_b = flat.detach()[self.b_index].clone()
        self.shared = flat.numel() - len(self.b_index)  # A's coordinates: all that travels
        self.own: dict[int, torch.Tensor] = {}
        self.new_b: dict[int, torch.Tensor] = {}  # this round's, for aggregation_error

    def client_job(self, job: ClientJob) -> ClientJob:
        job.own = OwnCoordinates(self.own.get(job.client_id, self.initial_b), self.b_index)
        job.coords_down = self.shared
        return job

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        """Client side: keep the new B, send the update without it."""
        cid = update.client_id
        delta = update.delta
        self.own[cid] = self.new_b[cid] = self.own.get(cid, self.initial_b) + delta[self.b_index].to(self.initial_b)
        update.delta = delta.index_fill(0, self.b_index.to(delta.device), 0)
        update.bytes_up -= len(self.b_index) * delta.element_size()
        return update

    def server_step(self, previous: torch.Tensor, weights: torch.Tensor,
                    updates: Sequence[ClientUpdate]) -> torch.Tensor:
        return weights  # the strategy's mean of A is the step

    def personal_weights(self, client_id: int, weights: torch.Tensor) -> torch.Tensor:
        return OwnCoordinates(self.own.get(client_id, self.initial_b), self.b_index).start(weights)

    def save_personal(self, run_dir: Path, *, round_idx: int) -> None:
        """client_lora_b.safetensors: `client_<id>`, each trained client's B factors (in the order of
        `b_index`: their positions in the run's flat adapter vector, model.safetensors' order)."""
        tensors = {f"client_{c}": b.detach().cpu().contiguous() for c, b in sorted(self.own.items())}
        tensors["b_index"] = self.b_index.cpu()
        meta = {"round": str(round_idx)}
        atomic_write(run_dir / OWN_B_FILE, lambda p: save_file(tensors, str(p), metadata=meta))

    def aggregation_error(self, previous: torch.Tensor, updates: Sequence[ClientUpdate]) -> float | None:
        new_b, self.new_b = self.new_b, {}
        if not updates or not updates[0].delta.is_floating_point():
            return None  # secure aggregation: nobody sees a client's A
        weights = torch.tensor([u.num_examples for u in updates], dtype=torch.float64, device=previous.device)
        weights = (weights / weights.sum()).view(-1, 1, 1)
        errors, b_at = [], 0  # b_at: where the layer's B starts in a client's B vector
        for (a_at, a_shape), (_, b_shape) in self.layers:
            a_i = torch.stack([(previous + u.delta)[a_at:a_at + a_shape.numel()].view(a_shape).double()
                               for u in updates])  # (N, r, in)
            a_mean = (weights * a_i).sum(0)
            for u, a in zip(updates, a_i):
                b = new_b[u.client_id][b_at:b_at + b_shape.numel()].view(b_shape).double()  # (out, r)
                exact = b @ a
                norm = torch.linalg.matrix_norm(exact)
                gap = torch.linalg.matrix_norm(exact - b @ a_mean)
                errors.append(float(gap / norm) if norm > 0 else 0.0)
            b_at += b_shape.numel()
        return sum(errors) / len(errors)

    def state_dict(self) -> dict:
        return {"own": {c: b.detach().cpu() for c, b in self.own.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.own = {int(c): b.to(self.initial_b.device) for c, b in state["own"].items()}
