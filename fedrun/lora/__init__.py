"""How clients' LoRA factors combine (`model.lora.aggregation`), one method per module.

`avg` (FedIT: A and B averaged apart, the strategy's own aggregate) and `ffa` (FFA-LoRA: A
frozen at a seeded draw, fedrun/models/hf.py) need nothing at the round level. A method that
does is a class here: it may give each client weights of its own (`client_job`), act on the
client's update before anything leaves the client (`on_client`, a client hook), say which
weights a client evaluates with (`personal_weights`) and measure its own aggregation error
(`aggregation_error`) and replace the strategy's server step (`server_step`); its state goes
into checkpoints.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from fedrun.core import ClientJob, ClientUpdate, RoundContext


class LoRAMethod(Protocol):
    personal: bool  # clients hold weights of their own (personal_weights, save_personal)

    def client_job(self, job: ClientJob) -> ClientJob: ...

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate: ...

    def personal_weights(self, client_id: int, weights: torch.Tensor) -> torch.Tensor: ...

    def save_personal(self, run_dir: Path, *, round_idx: int) -> None: ...

    def server_step(self, previous: torch.Tensor, weights: torch.Tensor,
                    updates: Sequence[ClientUpdate]) -> torch.Tensor:
        """The round's new global weights, given the strategy's (`weights`) and the updates."""

    def aggregation_error(self, previous: torch.Tensor, updates: Sequence[ClientUpdate]) -> float | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def round_method(aggregation: str, *, make_model: Callable[[], nn.Module], device: torch.device, seed: int,
                 rank_entries: Sequence[dict] | None = None, num_clients: int = 0) -> LoRAMethod | None:
    """The round-level part of `model.lora.aggregation`, or None when it has none (avg, ffa).
    `rank_entries`: client.lora_ranks (flora, flexlora, hetlora)."""
    if aggregation == "fedsa":
        from fedrun.lora.fedsa import FedSA

        return FedSA(make_model=make_model, device=device, seed=seed)
    methods = {"flora": ("fedrun.lora.flora", "FLoRA"), "flexlora": ("fedrun.lora.flexlora", "FlexLoRA"),
               "hetlora": ("fedrun.lora.hetlora", "HetLoRA")}
    if aggregation not in methods:
        return None
    module, name = methods[aggregation]
    method = getattr(importlib.import_module(module), name)
    return method(make_model=make_model, device=device, seed=seed, rank_entries=rank_entries, num_clients=num_clients)
