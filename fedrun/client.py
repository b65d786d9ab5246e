"""Local training of one client, on a model that is reused for every client of a worker.

Gradients, like weights, live in one flat buffer, so the strategy's client-side rule (its
`local_rule`, fedrun.core.LocalRule) is a vector operation on it: a term added to every local
gradient, and extra vectors sent beside the update.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fedrun.client_config import ClientConfig
from fedrun.core import (
    ClientJob,
    ClientUpdate,
    GradientTerm,
    LocalRule,
    RoundContext,
    Stream,
    derive_seed,
    seed_global_rng,
    torch_generator,
)
from fedrun.data.examples import ClientData, Examples
from fedrun.evaluation import batch_loss
from fedrun.flat_optim import descend, flat_optimizer
from fedrun.params import flatten_parameters
from fedrun.privacy.local_dp import DPSGDStep, ExampleDP, poisson_batches


def epoch_orders(num_examples: int, batch_size: int, num_steps: int,
                 generator: torch.Generator) -> Iterator[torch.Tensor]:
    """For each epoch that `num_steps` mini-batches touch, the order of the examples it uses:
    a fresh permutation, cut to the batches still to run."""
    remaining = num_steps
    while remaining > 0 and num_examples > 0:
        order = torch.randperm(num_examples, generator=generator)
        yield order[: remaining * batch_size]
        remaining -= math.ceil(min(num_examples, remaining * batch_size) / batch_size)


def batch_indices(num_examples: int, batch_size: int, num_steps: int,
                  generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`num_steps` mini-batches, reshuffling at each epoch; the last batch of an epoch may be short."""
    for order in epoch_orders(num_examples, batch_size, num_steps, generator):
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]


def batches(examples: Examples, batch_size: int, num_steps: int, generator: torch.Generator) -> Iterator[Examples]:
    """The mini-batches of `batch_indices`, as examples. Each epoch gathers its examples in
    order once and its batches are views into that: one indexing op an epoch, not one a step."""
    for order in epoch_orders(len(examples), batch_size, num_steps, generator):
        epoch = examples[order]
        for start in range(0, len(order), batch_size):
            yield epoch[start : start + batch_size]


class LocalTrainer:
    """One worker's model, flat weight and gradient buffers and optimizer, reset for each client."""

    def __init__(self, make_model: Callable[[], nn.Module], cfg: ClientConfig, device: torch.device,
                 example_dp: ExampleDP | None = None, *, local_rule: LocalRule | None = None):
        self.model = make_model().to(device)
        self.local_rule = local_rule  # the strategy's client side; None: plain local training
        self.flat = flatten_parameters(self.model)
        self.flat_grad = attach_flat_grads(self.model, self.flat)
        self.optimizer = flat_optimizer(self.flat.view(1, -1), cfg)
        self.cfg = cfg
        self.device = device
        self.dp_sgd = None if example_dp is None else DPSGDStep(
            self.model, max_grad_norm=example_dp.max_grad_norm, noise_multiplier=example_dp.noise_multiplier,
            noise_source=example_dp.noise_source)

    def train(self, job: ClientJob, data: ClientData, weights: torch.Tensor,
              ctx: RoundContext) -> ClientUpdate:
        """Train from `weights` (or the job's own start) on the client's data; return `local -
        start` and stats."""
        start = time.perf_counter()
        weights = job.start(weights)  # with weights of its own (strategy=local, fedsa), from those
        self.flat.copy_(weights)
        self.optimizer.reset()  # a fresh optimizer for each client, without re-creating it
        order = torch_generator(ctx.seed, Stream.CLIENT, ctx.round_idx, job.client_id)
        # Dropout draws from torch's global RNG: reseed it from the derived seed, so results
        # do not depend on which clients a worker trained before this one.
        seed_global_rng(derive_seed(ctx.seed, Stream.CLIENT, ctx.round_idx, job.client_id, 1), self.device)
        steps = self.cfg.num_steps(data.num_examples, order)
        term = None if self.local_rule is None else self.local_rule.gradient_term([job], weights)
        self.model.train()
        loss_sum, losses = torch.zeros((), device=self.device), 0
        for s, batch in enumerate(self._batches(data.train, steps, order)):
            x, y = batch.inputs_targets(self.device)
            loss = self._gradient(x, y, order, data.num_examples)
            if loss is not None:
                loss_sum, losses = loss_sum + loss, losses + 1
            self.step(s, term=term)
        delta = self.flat.detach() - weights
        extras = self.client_extras(job, delta, steps)
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

    def step(self, step: int, *, term: GradientTerm | None = None) -> None:
        """Local step number `step` from the gradient in flat_grad, plus the local rule's `term`."""
        descend(self.optimizer, self.flat.view(1, -1), self.flat_grad.view(1, -1), active=1, step=step, term=term)

    def client_extras(self, job: ClientJob, delta: torch.Tensor, steps: int) -> dict[str, torch.Tensor]:
        """What the local rule sends beside `delta` (nothing without one)."""
        if self.local_rule is None:
            return {}
        return self.local_rule.client_extras(job, delta, steps=steps, lr=self.cfg.lr)

    def _batches(self, examples: Examples, steps: int, order: torch.Generator) -> Iterator[Examples]:
        if self.dp_sgd is None:
            return batches(examples, self.cfg.batch_size, steps, order)
        # DP-SGD's accountant assumes Poisson sampling of examples at rate batch_size / n.
        rate = min(1.0, self.cfg.batch_size / len(examples))
        return (examples[idx] for idx in poisson_batches(len(examples), sample_rate=rate, num_steps=steps,
                                                        generator=order))

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fill flat_grad with the gradient of the batch's mean loss; return the loss."""
        self.flat_grad.zero_()
        loss = batch_loss(self.model, x, y)
        loss.backward()
        return loss.detach()

    def _gradient(self, x: torch.Tensor, y: torch.Tensor, order: torch.Generator,
                  num_examples: int) -> torch.Tensor | None:
        """Fill flat_grad with the batch's gradient; return its loss (None: an empty DP batch)."""
        if self.dp_sgd is None:
            return self.gradient(x, y)
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

