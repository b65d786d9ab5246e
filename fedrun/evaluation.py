"""Metrics of a model on a set of examples: cross-entropy, perplexity, accuracy.

For language models the loss is averaged over next-token predictions (instruction examples:
over the response's tokens only); for classifiers over examples. Perplexity is exp(loss) in
both cases (for a classifier, of the class distribution).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fedrun.core import FedrunError
from fedrun.data.examples import IGNORE, Examples, Windows

EVAL_TOKENS = 8192  # predictions per forward pass: bounds evaluation's activation memory
EVAL_EXAMPLES = 1024  # labelled examples per forward pass


def batch_loss(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's (a module's or a functional call's) logits (..., C) against targets (...)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def eval_batch(examples: Examples) -> int:
    """Examples per forward pass: ~EVAL_TOKENS next-token predictions for text windows."""
    if isinstance(examples, Windows):
        return max(1, EVAL_TOKENS // max(examples.tokens.shape[1] - 1, 1))
    return EVAL_EXAMPLES


@torch.inference_mode()
def evaluate_sums(model: nn.Module, examples: Examples, device: torch.device) -> tuple[float, int, int]:
    """(summed cross-entropy, correct top-1 predictions, predictions counted) over `examples`:
    what `evaluate` averages, and what pools across clients each scored by its own model."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    tokens = 0
    batch = eval_batch(examples)
    for start in range(0, len(examples), batch):
        x, y = examples[start : start + batch].inputs_targets(device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        correct += (logits.argmax(-1) == y).sum()  # an IGNORE target never equals a prediction
        tokens += int((y != IGNORE).sum()) if isinstance(examples, Windows) and examples.mask is not None \
            else y.numel()
    model.train(was_training)
    return float(loss_sum), int(correct), tokens


def scores(loss_sum: float, correct: int, count: int) -> dict[str, float]:
    """eval_loss, eval_ppl and eval_acc from `evaluate_sums`' sums."""
    loss = loss_sum / count
    # A diverged model's perplexity is reported as inf rather than crashing the run.
    return {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_acc": correct / count}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 709.0 else math.inf


def evaluate(model: nn.Module, examples: Examples, device: torch.device) -> dict[str, float]:
    """Loss averaged over all predictions, its perplexity, and top-1 accuracy.

    An empty set is an error: averaged over nothing, the loss would read 0 and the perplexity 1.
    """
    if len(examples) == 0:
        raise FedrunError("data: no test examples to evaluate on: a client holds out examples only when "
                          "data.test_fraction > 0 and it has at least 2; fedrun's eval metrics are test metrics")
    return scores(*evaluate_sums(model, examples, device))
