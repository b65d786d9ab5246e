"""Local training of one client, on a model that is reused for every client of a worker.

Gradients, like weights, live in one flat buffer, so the strategy's corrections are single
vector operations on it: FedProx (Li et al. 2020) adds mu * (w - w_global), SCAFFOLD
(Karimireddy et al. 2020) adds c - c_i to every local gradient.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from fedrun.core import ClientJob, ClientUpdate, RoundContext, Stream, derive_seed, seed_global_rng, torch_generator
from fedrun.data.examples import ClientData
from fedrun.evaluation import batch_loss
from fedrun.params import flatten_parameters
from fedrun.privacy.local_dp import DPSGDStep, poisson_batches

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
    local_steps_min: int | None = None  # stragglers: each client's steps drawn from [min, max]
    local_steps_max: int | None = None

    def num_steps(self, num_examples: int, generator: torch.Generator) -> int:
        if self.local_steps_min is not None:
            high = self.local_steps_max + 1
            return int(torch.randint(self.local_steps_min, high, (), generator=generator))
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


@dataclass(frozen=True)
class ExampleDP:
    """Example-level DP-SGD on the client (privacy=local_dp): Poisson batches of expected size
    client.batch_size, per-example clipping to max_grad_norm, Gaussian noise."""

    max_grad_norm: float
    noise_multiplier: float


class LocalTrainer:
    """One worker's model, flat weight and gradient buffers and optimizer, reset for each client."""

    def __init__(self, make_model: Callable[[], nn.Module], cfg: ClientConfig, device: torch.device,
                 example_dp: ExampleDP | None = None):
        self.model = make_model().to(device)
        self.flat = flatten_parameters(self.model)
        self.flat_grad = attach_flat_grads(self.model, self.flat)
        self.optimizer = make_optimizer([p for p in self.model.parameters() if p.requires_grad], cfg)
        self.cfg = cfg
        self.device = device
        self.dp_sgd = None if example_dp is None else DPSGDStep(
            self.model, max_grad_norm=example_dp.max_grad_norm, noise_multiplier=example_dp.noise_multiplier)

    def train(self, job: ClientJob, data: ClientData, weights: torch.Tensor,
              ctx: RoundContext) -> ClientUpdate:
        """Train from `weights` on the client's data; return `local - weights` and stats."""
        start = time.perf_counter()
        self.flat.copy_(weights)
        self.optimizer.state.clear()  # a fresh optimizer for each client, without re-creating it
        order = torch_generator(ctx.seed, Stream.CLIENT, ctx.round_idx, job.client_id)
        # Dropout draws from torch's global RNG: reseed it from the derived seed, so results
        # do not depend on which clients a worker trained before this one.
        seed_global_rng(derive_seed(ctx.seed, Stream.CLIENT, ctx.round_idx, job.client_id, 1), self.device)
        steps = self.cfg.num_steps(data.num_examples, order)
        correction = None if job.control is None else scaffold_correction(job)
        self.model.train()
        loss_sum, losses = torch.zeros((), device=self.device), 0
        for idx in self._batches(data.num_examples, steps, order):
            x, y = data.train[idx].inputs_targets(self.device)
            loss = self._gradient(x, y, order, data.num_examples)
            if loss is not None:
                loss_sum, losses = loss_sum + loss, losses + 1
            if job.prox_mu:  # gradient of (mu/2)||w - w_global||^2
                self.flat_grad.add_(self.flat.detach() - weights, alpha=job.prox_mu)
            if correction is not None:
                self.flat_grad.add_(correction)
            self.optimizer.step()
        delta = self.flat.detach() - weights
        extras = {} if job.control is None else {"control_delta": scaffold_control_delta(job, delta, steps, self.cfg.lr)}
        return ClientUpdate(
            client_id=job.client_id,
            delta=delta,
            num_examples=data.num_examples,
            train_loss=float(loss_sum) / max(losses, 1),
            seconds=time.perf_counter() - start,
            bytes_up=sum(t.numel() * t.element_size() for t in (delta, *extras.values())),
            num_steps=steps,
            extras=extras,
        )

    def _batches(self, num_examples: int, steps: int, order: torch.Generator):
        if self.dp_sgd is None:
            return batch_indices(num_examples, self.cfg.batch_size, steps, order)
        # DP-SGD's accountant assumes Poisson sampling of examples at rate batch_size / n.
        rate = min(1.0, self.cfg.batch_size / num_examples)
        return poisson_batches(num_examples, sample_rate=rate, num_steps=steps, generator=order)

    def _gradient(self, x: torch.Tensor, y: torch.Tensor, order: torch.Generator,
                  num_examples: int) -> torch.Tensor | None:
        """Fill flat_grad with the batch's gradient; return its loss (None: an empty DP batch)."""
        if self.dp_sgd is None:
            self.flat_grad.zero_()
            loss = batch_loss(self.model, x, y)
            loss.backward()
            return loss.detach()
        expected = min(self.cfg.batch_size, num_examples)
        loss = self.dp_sgd.compute(x, y, flat_grad=self.flat_grad, generator=order, expected_batch_size=expected)
        return None if math.isnan(loss) else torch.tensor(loss, device=self.device)


def attach_flat_grads(model: nn.Module, flat: torch.Tensor) -> torch.Tensor:
    """Give every trainable parameter a `.grad` that is a view into one zeroed buffer.

    Backward accumulates into an existing `.grad` in place, so the views persist as long as
    nobody sets them to None (we zero the buffer instead of calling `zero_grad`)."""
    flat_grad = torch.zeros_like(flat)
    for p in model.parameters():
        if p.requires_grad:
            offset = p.data.storage_offset() - flat.storage_offset()
            p.grad = flat_grad[offset : offset + p.numel()].view_as(p)
    return flat_grad


def scaffold_correction(job: ClientJob) -> torch.Tensor:
    """SCAFFOLD's drift correction c - c_i, added to every local gradient (c_i = 0 at first)."""
    return job.control if job.client_control is None else job.control - job.client_control


def scaffold_control_delta(job: ClientJob, delta: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """Option II: c_i+ = c_i - c + (x - y_i) / (K lr); the client sends c_i+ - c_i = -c - delta / (K lr)."""
    return -job.control - delta / (max(steps, 1) * lr)
