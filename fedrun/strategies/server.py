"""A server strategy: an aggregator, then a server optimizer fed `-delta` as its gradient.

Following Reddi et al. 2021 ("Adaptive Federated Optimization", Algorithm 1, FedOpt), the
aggregated client delta is a pseudo-gradient; the server takes one step of a real
`torch.optim` optimizer with it. SGD with lr 1 gives FedAvg exactly, SGD with momentum FedAvgM
(Hsu et al. 2019), `FedOpt` the adaptive FedAdam, FedYogi and FedAdagrad.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fedrun.core import ClientJob, ClientUpdate, RoundContext

Aggregator = Callable[[Sequence[ClientUpdate]], torch.Tensor]
OptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


class ServerStrategy:
    def __init__(self, aggregator: Aggregator, make_optimizer: OptimizerFactory, *, prox_mu: float = 0.0,
                 secure_sum_weighting: str | None = None):
        self.aggregator = aggregator
        # How the aggregate weighs clients when it is a weighted mean ("examples", "uniform"), so
        # secure aggregation can compute it from sums; None: it needs the individual updates.
        self.secure_sum_weighting = secure_sum_weighting
        self.make_optimizer = make_optimizer
        self.prox_mu = prox_mu
        self._param: torch.nn.Parameter | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None

    def begin_round(self, ctx: RoundContext) -> None:
        pass

    def client_job(self, client_id: int) -> ClientJob:
        return ClientJob(client_id=client_id, prox_mu=self.prox_mu)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        return self.aggregator(updates)

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
        return self._param, self._optimizer

    def state_dict(self) -> dict:
        state = self._optimizer.state_dict() if self._optimizer is not None else self._pending_state
        return {"optimizer": state}

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = state.get("optimizer")
        if self._optimizer is not None and self._pending_state is not None:
            self._optimizer.load_state_dict(self._pending_state)
