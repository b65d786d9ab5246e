"""Server strategies, one factory per `strategy=` option; each returns an object with
`client_job`, `aggregate`, `apply`, `state_dict` and `load_state_dict` (fedrun.core.Strategy).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch

from fedrun.core import ClientUpdate
from fedrun.strategies import robust
from fedrun.strategies.aggregate import weighted_mean
from fedrun.strategies.feddf import FedDF
from fedrun.strategies.scaffold import Scaffold
from fedrun.strategies.server import ServerStrategy
from fedrun.strategies.server_opt import FedOpt


def example_weighted(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    return weighted_mean([u.delta for u in updates], [u.num_examples for u in updates])


def _stacked(fn, **kwargs):
    """A robust aggregator over the stacked (K, D) deltas; robust rules ignore example counts."""
    return lambda updates: fn(torch.stack([u.delta for u in updates]), **kwargs)


def _sgd(lr: float = 1.0, momentum: float = 0.0):
    return partial(torch.optim.SGD, lr=lr, momentum=momentum)


def fedavg() -> ServerStrategy:
    """McMahan et al. 2017: w <- w + sum_i (n_i / n) delta_i."""
    return ServerStrategy(example_weighted, _sgd(), secure_sum_weighting="examples")


def fedavgm(*, server_lr: float, momentum: float) -> ServerStrategy:
    """Hsu et al. 2019: v <- momentum v + delta; w <- w + server_lr v."""
    return ServerStrategy(example_weighted, _sgd(server_lr, momentum), secure_sum_weighting="examples")


def _fedopt(kind: str, *, server_lr: float, beta1: float, beta2: float, tau: float) -> ServerStrategy:
    return ServerStrategy(example_weighted, partial(FedOpt, kind=kind, lr=server_lr, beta1=beta1, beta2=beta2, tau=tau),
                          secure_sum_weighting="examples")


fedadam = partial(_fedopt, "adam")
fedyogi = partial(_fedopt, "yogi")
fedadagrad = partial(_fedopt, "adagrad")


def fedprox(*, mu: float) -> ServerStrategy:
    """Li et al. 2020: FedAvg whose clients minimise f_i(w) + (mu / 2) ||w - w_global||^2."""
    return ServerStrategy(example_weighted, _sgd(), prox_mu=mu, secure_sum_weighting="examples")


def scaffold(*, server_lr: float, num_clients: int, num_params: int, device: torch.device) -> Scaffold:
    return Scaffold(server_lr=server_lr, num_clients=num_clients, num_params=num_params, device=device)


def median() -> ServerStrategy:
    """Coordinate-wise median (Yin et al. 2018)."""
    return ServerStrategy(_stacked(robust.coordinate_median), _sgd())


def trimmed_mean(*, trim: float) -> ServerStrategy:
    """Coordinate-wise trimmed mean, `trim` of the values cut at each side (Yin et al. 2018)."""
    return ServerStrategy(_stacked(robust.trimmed_mean, trim=trim), _sgd())


def krum(*, num_byzantine: int, multi: int) -> ServerStrategy:
    """Krum (Blanchard et al. 2017), or Multi-Krum's mean of the `multi` best (multi > 1)."""
    return ServerStrategy(_stacked(robust.krum, num_byzantine=num_byzantine, multi=multi), _sgd())


def feddf(*, temperature: float, distill_steps: int, distill_lr: float, distill_batch: int, eval_every: int,
          public, make_model, seed: int, device: torch.device) -> FedDF:
    """FedAvg, then server-side ensemble distillation on a public corpus (Lin et al. 2020)."""
    return FedDF(example_weighted, _sgd(), make_model=make_model, public=public, temperature=temperature,
                 distill_steps=distill_steps, distill_lr=distill_lr, distill_batch=distill_batch,
                 eval_every=eval_every, seed=seed, device=device)
feddf.config_nodes = {"public": "data"}  # type: ignore[attr-defined]
