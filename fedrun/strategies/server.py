"""The base of the server strategies: an aggregate, then a server optimizer fed `-delta`.

Following Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 1, FedOpt), the
aggregated client delta is a pseudo-gradient; the server takes one step of a real
`torch.optim` optimizer with it. The base is FedAvg's two halves, the example-weighted mean and
SGD with lr 1 (which adds the mean exactly); an option overrides `aggregate` (robust rules) or
`make_optimizer` (FedAvgM's momentum, the adaptive FedAdam, FedYogi and FedAdagrad), and may
bring a client-side rule (`local_rule`: FedProx).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrun.core import ClientJob, ClientUpdate, LocalRule, RoundContext
from fedrun.strategies.aggregate import example_weighted


class ServerStrategy:
    """FedAvg's aggregate and server step; the capabilities of a strategy that declares none."""

    needs_individual_updates = False
    secure_sum_weighting: str | None = None  # see fedrun.components.CAPABILITIES["strategy"]
    local_rule: LocalRule | None = None  # its clients train plainly

    def __init__(self) -> None:
        self._param: torch.nn.Parameter | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None

    def begin_round(self, ctx: RoundContext) -> None:
        pass

    def client_job(self, client_id: int) -> ClientJob:
        return ClientJob(client_id=client_id)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        return example_weighted(updates)

    def make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=1.0, momentum=0.0)

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        param, optimizer = self._server_optimizer(weights)
        with torch.no_grad():
            param.copy_(weights)
        param.grad = -delta
        optimizer.step()
        return param.detach().clone()

    def _server_optimizer(self, weights: torch.Tensor) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
        """Created on first use, when the size of the weights is known."""
        if self._optimizer is None:
            self._param = torch.nn.Parameter(weights.detach().clone())
            self._optimizer = self.make_optimizer([self._param])
            if self._pending_state is not None:
                self._optimizer.load_state_dict(self._pending_state)
        assert self._param is not None
        return self._param, self._optimizer

    def state_dict(self) -> dict:
        state = self._optimizer.state_dict() if self._optimizer is not None else self._pending_state
        return {"optimizer": state}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state.get("optimizer")
        if self._optimizer is not None and self._pending_state is not None:
            self._optimizer.load_state_dict(self._pending_state)
