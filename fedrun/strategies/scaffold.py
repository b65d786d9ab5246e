"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"), option II control variates.

The server keeps its control variate c; client i keeps c_i (simulated here, server-side, in a
dict: it is client state, sent to nobody, and saved in checkpoints). Each local gradient is
corrected by c - c_i. After K local SGD steps of rate lr a client sends
dy_i = y_i - x and dc_i = c_i+ - c_i with c_i+ = c_i - c + (x - y_i) / (K lr). The server sets
x <- x + server_lr * mean(dy_i) and c <- c + (|S| / N) mean(dc_i).
"""
from __future__ import annotations

from typing import Sequence

import torch

from fedrun.core import ClientJob, ClientUpdate, RoundContext


class Scaffold:
    def __init__(self, *, server_lr: float, num_clients: int, num_params: int, device: torch.device):
        self.server_lr = server_lr
        self.num_clients = num_clients
        self.control = torch.zeros(num_params, device=device)
        self.client_controls: dict[int, torch.Tensor] = {}

    def begin_round(self, ctx: RoundContext) -> None:
        pass

    def client_job(self, client_id: int) -> ClientJob:
        return ClientJob(client_id=client_id, control=self.control, client_control=self.client_controls.get(client_id))

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        control_deltas = [u.extras["control_delta"] for u in updates]
        for u, dc in zip(updates, control_deltas):
            old = self.client_controls.get(u.client_id)
            self.client_controls[u.client_id] = dc.clone() if old is None else old + dc
        self.control = self.control + torch.stack(control_deltas).sum(0) / self.num_clients
        return torch.stack([u.delta for u in updates]).mean(0)

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return weights + self.server_lr * delta

    def state_dict(self) -> dict:
        return {"control": self.control, "client_controls": self.client_controls}

    def load_state_dict(self, state: dict) -> None:
        device = self.control.device
        self.control = state["control"].to(device)
        self.client_controls = {int(k): v.to(device) for k, v in state["client_controls"].items()}
