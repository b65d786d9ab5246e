"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"), option II control variates.

The server keeps its control variate c and sends it down; client i keeps c_i (simulated here,
server-side, in a dict: it is client state, sent to nobody, and saved in checkpoints; it reaches
the client as its job's `state`). Each local gradient is corrected by c - c_i (`ControlVariates`,
the strategy's local rule). After K local SGD steps of rate lr a client sends
dy_i = y_i - x and dc_i = c_i+ - c_i with c_i+ = c_i - c + (x - y_i) / (K lr). The server sets
x <- x + server_lr * mean(dy_i) and c <- c + (|S| / N) mean(dc_i).

Both server updates are sums (a plain mean and a sum of control deltas), so secure aggregation
can compute them (`aggregate_sums`); each client's c_i <- c_i + dc_i is its own state, updated
on the client side (`client_state`, run before anything leaves the client).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.core import ClientJob, ClientUpdate, GradientTerm, RoundContext


class ControlVariates:
    """SCAFFOLD's client side: each local gradient corrected by c - c_i; dc_i sent back."""

    def gradient_term(self, jobs: Sequence[ClientJob], weights: torch.Tensor) -> GradientTerm:
        # (K, D) c - c_i of each client, once before its steps (c_i = 0 before its first round)
        correction = torch.stack([job.payload["control"] if "control" not in job.state
                                  else job.payload["control"] - job.state["control"] for job in jobs])

        def term(grad: torch.Tensor, rows: torch.Tensor) -> None:
            grad.add_(correction[: len(rows)])

        return term

    def client_extras(self, job: ClientJob, delta: torch.Tensor, *, steps: int, lr: float) -> dict[str, torch.Tensor]:
        """Option II: c_i+ = c_i - c + (x - y_i) / (K lr); the client sends c_i+ - c_i = -c - delta / (K lr)."""
        return {"control_delta": -job.payload["control"] - delta / (max(steps, 1) * lr)}


class Scaffold:
    secure_sum_weighting = "uniform"  # the plain mean of dy_i
    secure_sum_extras = ("control_delta",)  # summed beside it
    client_sends_extras = True
    needs_plain_sgd = True  # the control variates' option II assumes plain local SGD steps
    local_rule = ControlVariates()

    def __init__(self, *, server_lr: Annotated[float, Range(gt=0)], num_clients: int, num_params: int,
                 device: torch.device):
        self.server_lr = server_lr
        self.num_clients = num_clients
        self.control = torch.zeros(num_params, device=device)
        self.client_controls: dict[int, torch.Tensor] = {}
        self.client_state = ClientControls(self.client_controls)

    def begin_round(self, ctx: RoundContext) -> None:
        pass

    def client_job(self, client_id: int) -> ClientJob:
        own = self.client_controls.get(client_id)
        return ClientJob(client_id=client_id, payload={"control": self.control},
                         state={} if own is None else {"control": own})

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        control_sum = torch.stack([u.extras["control_delta"] for u in updates]).sum(0)
        return self.aggregate_sums(torch.stack([u.delta for u in updates]).mean(0), {"control_delta": control_sum})

    def aggregate_sums(self, mean_delta: torch.Tensor, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """c <- c + sum(dc_i) / N; the model moves by the mean of dy_i."""
        self.control = self.control + sums["control_delta"].to(self.control) / self.num_clients
        return mean_delta

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return weights + self.server_lr * delta

    def state_dict(self) -> dict:
        return {"control": self.control, "client_controls": self.client_controls}

    def load_state_dict(self, state: dict) -> None:
        device = self.control.device
        self.control = state["control"].to(device)
        self.client_controls.clear()  # the dict client_state updates
        self.client_controls.update({int(k): v.to(device) for k, v in state["client_controls"].items()})


class ClientControls:
    """Client side: each client keeps its c_i (simulated in one dict, sent to nobody)."""

    def __init__(self, controls: dict[int, torch.Tensor]):
        self.controls = controls

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        dc = update.extras["control_delta"]
        old = self.controls.get(update.client_id)
        self.controls[update.client_id] = dc.clone() if old is None else old + dc
        return update
