"""Plain PyTorch pieces every contender but fedrun shares: examples, local SGD, evaluation.

Only torch is needed here (no fedrun), so the Flower and pfl scripts in `.venv-bench` use
the very same local training and evaluation code as the floor. Examples come in the two
kinds fedrun has: byte windows (N, T + 1), whose inputs are the first T bytes and targets
the last T, and labelled features (N, F) with labels (N,). Instruction windows carry a
(N, T + 1) `mask` too: only the targets it marks (the response's) count in a loss.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# The same forward-pass sizes as fedrun's evaluation (fedrun/evaluation.py), so evaluation
# costs every contender the same memory.
EVAL_TOKENS = 8192
EVAL_EXAMPLES = 1024
IGNORE = -100  # a target no loss counts (cross_entropy's ignore_index, fedrun's IGNORE)


def eval_batch(examples: dict[str, torch.Tensor]) -> int:
    if "tokens" in examples:
        return max(1, EVAL_TOKENS // max(examples["tokens"].shape[1] - 1, 1))
    return EVAL_EXAMPLES


def inputs_targets(examples: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) inputs and targets of windows (IGNORE where a mask leaves a target out), or
    (B, F) features and (B,) labels."""
    if "tokens" in examples:
        tokens = examples["tokens"].long()
        if "mask" in examples:
            return tokens[:, :-1], tokens[:, 1:].masked_fill(~examples["mask"][:, 1:], IGNORE)
        return tokens[:, :-1], tokens[:, 1:]
    return examples["features"], examples["labels"]


def take(examples: dict[str, torch.Tensor], idx: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in examples.items()}


def size(examples: dict[str, torch.Tensor]) -> int:
    return len(next(iter(examples.values())))


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction=reduction)


def local_sgd(model: nn.Module, optimizer: torch.optim.Optimizer, examples: dict[str, torch.Tensor],
              batches: Iterable[torch.Tensor]) -> int:
    """Steps of the (momentum-free, hence stateless) optimizer on the given mini-batches of the
    client's examples; returns the steps taken."""
    model.train()
    steps = 0
    for idx in batches:
        x, y = inputs_targets(take(examples, idx))
        optimizer.zero_grad(set_to_none=False)
        loss_of(model, x, y).backward()
        optimizer.step()
        steps += 1
    return steps


def epoch_batches(num_examples: int, batch_size: int, num_steps: int,
                  generator: torch.Generator) -> Iterable[torch.Tensor]:
    """`num_steps` batches, reshuffled each epoch (the same draws as fedrun's client.batch_indices)."""
    step = 0
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples, batch_size):
            if step == num_steps:
                return
            yield order[start : start + batch_size]
            step += 1


def num_steps(num_examples: int, *, batch_size: int, local_steps: int | None, local_epochs: int | None) -> int:
    if local_steps is not None:
        return local_steps
    return local_epochs * -(-num_examples // batch_size)


@torch.inference_mode()
def eval_loss(model: nn.Module, examples: dict[str, torch.Tensor]) -> float:
    """Cross-entropy averaged over every prediction of the test set that counts."""
    model.eval()
    total, count = 0.0, 0
    batch = eval_batch(examples)
    for start in range(0, size(examples), batch):
        x, y = inputs_targets(take(examples, slice(start, start + batch)))
        total += float(loss_of(model, x, y, reduction="sum"))
        count += int((y != IGNORE).sum())
    model.train()
    return total / max(count, 1)
