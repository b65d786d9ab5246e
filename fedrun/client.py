"""Local training of one client, on a model that is reused for every client of a worker."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from fedrun.core import ClientUpdate, RoundContext, Stream, derive_seed, torch_generator
from fedrun.data.examples import ClientData
from fedrun.evaluation import batch_loss
from fedrun.params import flatten_parameters

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class ClientConfig:
    """The `client` config group: how each client trains locally."""

    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    local_epochs: int | None
    local_steps: int | None

    def num_steps(self, num_examples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return self.local_epochs * math.ceil(num_examples / self.batch_size)


def make_optimizer(params, cfg: ClientConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"client.optimizer: unknown optimizer {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")


def batch_indices(num_examples: int, batch_size: int, num_steps: int,
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`num_steps` mini-batches, reshuffling at each epoch; the last batch of an epoch may be short."""
    step = 0
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, batch_size):
            if step == num_steps:
                return
            yield order[start : start + batch_size]
            step += 1


class LocalTrainer:
    """One worker's model, flat weight buffer and optimizer, reset for each client."""

    def __init__(self, make_model: Callable[[], nn.Module], cfg: ClientConfig, device: torch.device):
        self.model = make_model().to(device)
        self.flat = flatten_parameters(self.model)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.cfg = cfg
        self.device = device

    def train(self, client_id: int, data: ClientData, weights: torch.Tensor,
              ctx: RoundContext) -> ClientUpdate:
        """Train from `weights` on the client's data; return `local - weights` and stats."""
        start = time.perf_counter()
        self.flat.copy_(weights)
        self.optimizer.state.clear()  # a fresh optimizer for each client, without re-creating it
        order = torch_generator(ctx.seed, Stream.CLIENT, ctx.round_idx, client_id)
        # Dropout draws from torch's global RNG: reseed it from the derived seed, so results
        # do not depend on which clients a worker trained before this one.
        torch.manual_seed(derive_seed(ctx.seed, Stream.CLIENT, ctx.round_idx, client_id, 1))
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        steps = self.cfg.num_steps(data.num_examples)
        for idx in batch_indices(data.num_examples, self.cfg.batch_size, steps, order):
            x, y = data.train[idx].inputs_targets(self.device)
            loss = batch_loss(self.model, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            loss_sum += loss.detach()
        delta = self.flat.detach() - weights
        return ClientUpdate(
            client_id=client_id,
            delta=delta,
            num_examples=data.num_examples,
            train_loss=float(loss_sum) / max(steps, 1),
            seconds=time.perf_counter() - start,
            bytes_up=delta.numel() * delta.element_size(),
        )
