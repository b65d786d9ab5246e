"""strategy=local: the baseline in which every client trains alone on its own data and nothing
is ever exchanged or averaged (the "local only" row of federated fine-tuning papers).

A client starts from the run's initial weights (the global model's of any other strategy with
the same seed) and, each time it is sampled, continues from where it stopped, with the same
local steps as under federated training. Its weights are client-side state (simulated here
in one dict, checkpointed), so bytes up and down are 0. There is no global model to evaluate:
the run's eval metrics score each client's test examples with that client's own model (pooled
over clients, token- or example-weighted), and `eval.per_client` lists them client by client.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fedrun.core import ClientJob, ClientUpdate, OwnCoordinates, RoundContext
from fedrun.rundir import atomic_write
from fedrun.server_model import initial_model

OWN_MODELS_FILE = "client_models.safetensors"


class Local:
    exchanges = "nothing"

    def __init__(self, *, make_model: Callable[[], nn.Module], device: torch.device, seed: int):
        self.initial = initial_model(make_model, device, seed)[1].detach().clone()  # the global model's start
        self.own: dict[int, torch.Tensor] = {}
        self.client_state = OwnWeights(self)

    def begin_round(self, ctx: RoundContext) -> None:
        pass

    def client_job(self, client_id: int) -> ClientJob:
        return ClientJob(client_id=client_id, own=OwnCoordinates(self.personal_weights(client_id)), coords_down=0)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        return self.initial.new_zeros(0)  # nothing to combine: the loop's weights stay the initial ones

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return weights

    def personal_weights(self, client_id: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The weights client `client_id` holds now (the initial ones before it first trains)."""
        return self.own.get(client_id, self.initial)

    def save_personal(self, run_dir: Path, *, round_idx: int) -> None:
        """client_models.safetensors: `client_<id>` for every client that has trained."""
        tensors = {f"client_{c}": w.detach().cpu().contiguous() for c, w in sorted(self.own.items())}
        meta = {"round": str(round_idx)}
        atomic_write(run_dir / OWN_MODELS_FILE, lambda p: save_file(tensors, str(p), metadata=meta))

    def state_dict(self) -> dict:
        return {"own": {c: w.detach().cpu() for c, w in self.own.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.own.clear()
        self.own.update({int(c): w.to(self.initial.device) for c, w in state["own"].items()})


class OwnWeights:
    """Client side: a client keeps the weights it ends with and sends nothing."""

    def __init__(self, strategy: Local):
        self.strategy = strategy

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        start = self.strategy.personal_weights(update.client_id)
        self.strategy.own[update.client_id] = start + update.delta.to(start)
        update.bytes_up = 0  # nothing leaves the client
        return update
