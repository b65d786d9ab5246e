"""`backend=vectorized`: the round's clients train at once, as one batched computation.

Each client's weights are a row of a (K, D) stack; one batched forward pass (grouped matmuls or
vmap) and one backward pass per local step give every row its own gradient (`StackedModel`),
and a functional optimizer updates all rows in a few tensor ops (`fedrun.flat_optim`). Each
client keeps its own data order (the same generator draws as `LocalTrainer.train`), its own
optimizer state and its own row of the strategy's local term (`LocalRule.gradient_term`), so
the updates equal sequential training's to float tolerance.

Ragged work is padded and masked: a short batch is padded with weight-0 examples, and clients
are ordered by their number of steps, longest first, so the clients still training at step s
are a prefix of the stack and a finished client is simply left out of later steps.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from torch import nn

from fedrun.backends.hooks import apply_client_hooks
from fedrun.backends.sequential import SequentialBackend
from fedrun.backends.stacked_model import StackedModel
from fedrun.client import LocalTrainer, batch_indices
from fedrun.components import Range
from fedrun.core import (
    ClientHook,
    ClientJob,
    ClientUpdate,
    FedrunError,
    GradientTerm,
    RoundContext,
    Stream,
    derive_seed,
    seed_global_rng,
    torch_generator,
)
from fedrun.data.examples import ClientData, FederatedData, concat
from fedrun.flat_optim import FlatOptimizer, descend, flat_optimizer

log = logging.getLogger(__name__)

# What vmap raises for a model it cannot batch (a missing batching rule, data-dependent control flow).
VMAP_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


@dataclass
class ClientPlan:
    """One client's local work this round: its job and the example indices of each step."""

    job: ClientJob
    data: ClientData
    batches: list[torch.Tensor]


def plan_client(job: ClientJob, data: ClientData, trainer: LocalTrainer, ctx: RoundContext) -> ClientPlan:
    """The same generator draws as `LocalTrainer.train`: steps, then each epoch's permutation."""
    order = torch_generator(ctx.seed, Stream.CLIENT, ctx.round_idx, job.client_id)
    steps = trainer.cfg.num_steps(data.num_examples, order)
    return ClientPlan(job, data, list(batch_indices(data.num_examples, trainer.cfg.batch_size, steps, order)))


@dataclass
class PaddedSteps:
    """A group's steps as padded indices into its clients' concatenated examples.

    Clients are ordered longest-first: at step s the clients still training are rows
    [:active[s]], and every batch among them fits in width[s] slots."""

    index: torch.Tensor  # (S, K, B) int64; padding points at one of the client's own examples
    share: torch.Tensor  # (S, K, B) float32: a real example's share of its batch (1 / its size), 0 for padding
    active: list[int]  # (S,)
    width: list[int]  # (S,)


def pad_steps(plans: Sequence[ClientPlan]) -> PaddedSteps:
    lengths = torch.tensor([len(p.batches) for p in plans])
    num_steps = int(lengths.max())
    sizes = torch.tensor([len(b) for p in plans for b in p.batches])  # every batch, client after client
    width = int(sizes.max()) if len(sizes) else 1
    offsets = torch.tensor([0] + [p.data.num_examples for p in plans]).cumsum(0)[:-1]
    # Padding points at the client's first example (weight 0); then every batch's slots at once.
    index = offsets.view(1, -1, 1).expand(num_steps, len(plans), width).clone()
    weight = torch.zeros(num_steps, len(plans), width)
    client = torch.repeat_interleave(torch.arange(len(plans)), lengths)  # per batch
    step = torch.cat([torch.arange(n) for n in lengths.tolist()])
    slot = torch.arange(len(sizes)).repeat_interleave(sizes)  # per example: which batch
    position = torch.arange(int(sizes.sum())) - (sizes.cumsum(0) - sizes).repeat_interleave(sizes)
    examples = torch.cat([b for p in plans for b in p.batches]) if len(sizes) else torch.zeros(0, dtype=torch.int64)
    index[step[slot], client[slot], position] = examples + offsets[client[slot]]
    weight[step[slot], client[slot], position] = 1.0
    active = (lengths > torch.arange(num_steps)[:, None]).sum(1)  # (S,)
    real = weight.sum(2, keepdim=True)  # (S, K, 1) real examples per batch; a finished client's: 0
    if (targets := counted_targets(plans)) is not None:
        # instruction examples weigh by their counted (response) tokens, as batch_loss's mean does
        weight[step[slot], client[slot], position] = targets[examples + offsets[client[slot]]]
    share = weight / weight.sum(2, keepdim=True).clamp_min(1)
    return PaddedSteps(index, share, active.tolist(), real.amax(1).view(-1).long().tolist())


def counted_targets(plans: Sequence[ClientPlan]) -> torch.Tensor | None:
    """(N,) float32 each training example's counted targets, clients in plan order; None for
    examples without a loss mask (every target counts: they weigh alike)."""
    masks: list[torch.Tensor] = []
    for plan in plans:
        mask = getattr(plan.data.train, "mask", None)
        if mask is None:
            return None
        masks.append(mask)
    return torch.cat([m[:, 1:].sum(1) for m in masks]).float()


def dropout_rate(model: nn.Module) -> float:
    """The largest dropout probability anywhere in the model (dropout layers, attention, RNNs)."""
    rates = [m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    rates += [rate for m in model.modules() if isinstance(rate := getattr(m, "dropout", None), float)]
    return max(rates, default=0.0)


def unbatchable(trainer) -> str | None:
    """Why this trainer's clients cannot train as one batch (None: they can)."""
    if type(trainer) is not LocalTrainer:
        return f"the trainer is a {type(trainer).__name__}, not a plain LocalTrainer"
    if trainer.dp_sgd is not None:
        return "example-level DP-SGD (privacy=local_dp) clips and noises each client's gradients itself"
    # vmap has no batching rule for the fused RNN kernels on the CPU, but on CUDA it runs
    # cuDNN's RNN under vmap without complaint and trains wrongly: decide by the module.
    if rnn := next((m for m in trainer.model.modules() if isinstance(m, nn.RNNBase)), None):
        return f"vmap cannot batch the fused recurrent layer {type(rnn).__name__}"
    if any(getattr(p, "_backward_hooks", None) for p in trainer.model.parameters()):
        return "a parameter's gradient is shaped by a hook (model.lora.aggregation=flora keeps base weights fixed " \
               "so), which the stacked functional call would bypass"
    if (rate := dropout_rate(trainer.model)) > 0:
        return f"the model has dropout {rate} > 0, whose masks each client draws from its own RNG stream"
    return None


class VectorizedBackend:
    """Trains the cohort in groups of at most `max_clients` clients, each group as one batch."""

    def __init__(self, *, make_trainer: Callable[[], LocalTrainer], data: FederatedData,
                 client_hooks: Sequence[ClientHook],
                 max_clients: Annotated[int, Range(ge=1, null="the whole cohort")] | None):
        if max_clients is not None and max_clients < 1:
            raise FedrunError(f"backend.max_clients: {max_clients} is not allowed; allowed: null or an integer >= 1")
        trainer = make_trainer()
        self.trainer, self.data, self.client_hooks, self.max_clients = trainer, data, client_hooks, max_clients
        self.sequential = SequentialBackend(make_trainer=lambda: trainer, data=data, client_hooks=client_hooks)
        self.fallback = unbatchable(trainer)
        self.notices: list[str] = []  # logged when training starts: the run's train.log is attached after the build
        if self.fallback is not None:
            log.warning("backend=vectorized: training clients sequentially: %s", self.fallback)
        else:
            self.stacked = StackedModel(trainer.model, flat=trainer.flat, flat_grad=trainer.flat_grad)
            if self.stacked.mode == "vmap" and trainer.device.type == "cpu":
                # Measured, not guessed: benchmarks.batching_bound finds that on this project's CPU
                # even one model on all the clients' batches at once gains at most ~1.25x on
                # W1's models, and vmap's bigger working sets lose more than that.
                self.notices.append(f"backend=vectorized: {type(trainer.model).__name__} is batched with vmap; on a "
                                    "CPU that is usually slower than backend=sequential for a compute-heavy model "
                                    "(W1 tiny_gpt: 0.7x), and faster on a GPU")

    def train_cohort(self, weights: torch.Tensor, jobs: Sequence[ClientJob],
                     ctx: RoundContext) -> list[ClientUpdate]:
        for notice in self.notices:
            log.info("%s", notice)
        self.notices = []
        if self.fallback is None and jobs:
            try:
                updates = self.train_batched(weights, jobs, ctx)
            except VMAP_ERRORS as e:
                if self.stacked.vmapped:  # it has batched this model before: a real error
                    raise
                self.fallback = f"vmap cannot batch this model ({type(e).__name__}: {str(e).splitlines()[0]})"
                log.warning("backend=vectorized: training clients sequentially: %s", self.fallback)
            else:
                return self.run_hooks(updates, ctx)
        return self.sequential.train_cohort(weights, jobs, ctx)

    def train_batched(self, weights: torch.Tensor, jobs: Sequence[ClientJob],
                      ctx: RoundContext) -> list[ClientUpdate]:
        """Every client's update, in job order, before the client hooks."""
        plans = [plan_client(job, self.data.clients[job.client_id], self.trainer, ctx) for job in jobs]
        # Longest first, so a group's finished clients are always its last rows; grouping by
        # length also keeps the clients of a group finishing together.
        order = sorted(range(len(plans)), key=lambda i: -len(plans[i].batches))
        size = self.max_clients or len(plans)
        updates: dict[int, ClientUpdate] = {}
        for start in range(0, len(order), size):
            group = order[start : start + size]
            for i, update in zip(group, self.train_group([plans[i] for i in group], weights)):
                updates[i] = update
        return [updates[i] for i in range(len(plans))]

    def run_hooks(self, updates: list[ClientUpdate], ctx: RoundContext) -> list[ClientUpdate]:
        """The client hooks, in job order, as SequentialBackend runs them (they draw nothing
        from torch's global RNG); that RNG is then left as sequential training leaves it
        (LocalTrainer reseeds it per client), so a checkpoint's saved RNG state is the same."""
        updates = [apply_client_hooks(update, self.client_hooks, ctx) for update in updates]
        seed_global_rng(derive_seed(ctx.seed, Stream.CLIENT, ctx.round_idx, updates[-1].client_id, 1),
                        self.trainer.device)
        return updates

    def train_group(self, plans: Sequence[ClientPlan], weights: torch.Tensor) -> list[ClientUpdate]:
        """Train the group's clients (longest first) together; their updates in the same order."""
        start = time.perf_counter()
        device, cfg = self.trainer.device, self.trainer.cfg
        x_all, y_all = concat([p.data.train for p in plans]).inputs_targets(device)
        steps = pad_steps(plans)
        index, share = steps.index.to(device), steps.share.to(device)
        starts = [p.job.start(weights) for p in plans]  # the global weights, or a client's own (strategy=local)
        stack = torch.stack(starts)  # (K, D): row k is client k's weights
        optimizer = flat_optimizer(stack, cfg)
        rule = self.trainer.local_rule
        term = None if rule is None else rule.gradient_term([p.job for p in plans], weights)  # row k: plans[k]
        loss_sum = torch.zeros(len(plans), device=device)
        for s, (active, width) in enumerate(zip(steps.active, steps.width)):
            if active == 1:  # the longest client alone: often most of a round's steps (power-law sizes)
                self.finish_alone(stack, optimizer, plans[0], s, loss_sum, term=term)
                break
            idx = index[s, :active, :width]  # (a, B)
            grad, loss = self.stacked.gradients(stack[:active], gather(x_all, idx), gather(y_all, idx),
                                                share[s, :active, :width])
            loss_sum[:active] += loss
            descend(optimizer, stack, grad, active=active, step=s, term=term)
        seconds = (time.perf_counter() - start) / len(plans)
        return [self.client_update(p, stack[k] - starts[k], float(loss_sum[k]), seconds) for k, p in enumerate(plans)]

    def finish_alone(self, stack: torch.Tensor, optimizer: FlatOptimizer, plan: ClientPlan, first: int,
                     loss_sum: torch.Tensor, *, term: GradientTerm | None) -> None:
        """Row 0's steps from `first` on, as sequential training takes them: the row lives in the
        trainer's flat buffer meanwhile, a step's gradient is `LocalTrainer.gradient` on the
        plain model, and the group's optimizer steps it with row 0's state."""
        trainer = self.trainer
        trainer.flat.copy_(stack[0])
        row, grad = trainer.flat.view(1, -1), trainer.flat_grad.view(1, -1)
        train = plan.data.train
        with torch.enable_grad():
            for s in range(first, len(plan.batches)):
                x, y = train[plan.batches[s]].inputs_targets(trainer.device)
                loss_sum[0] += trainer.gradient(x, y)
                descend(optimizer, row, grad, active=1, step=s, term=term)
        stack[0].copy_(trainer.flat)

    def client_update(self, plan: ClientPlan, delta: torch.Tensor, loss_sum: float, seconds: float) -> ClientUpdate:
        """The fields `LocalTrainer.train` fills, from the batched results."""
        steps, job = len(plan.batches), plan.job
        extras = self.trainer.client_extras(job, delta, steps)
        return ClientUpdate(
            client_id=job.client_id,
            delta=delta,
            num_examples=plan.data.num_examples,
            train_loss=loss_sum / max(steps, 1),
            seconds=seconds,
            bytes_up=sum(t.numel() * t.element_size() for t in (delta, *extras.values())),
            num_steps=steps,
            extras=extras,
        )

    def close(self) -> None:
        """Nothing to release: the stack lives only during a round."""


def gather(examples: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """examples[idx] for an (a, B) index: index_select costs a third of advanced indexing."""
    return examples.index_select(0, idx.reshape(-1)).view(*idx.shape, *examples.shape[1:])

