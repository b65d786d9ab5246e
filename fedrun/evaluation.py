"""Next-token metrics of a model on a set of windows: cross-entropy, perplexity, accuracy."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH_WINDOWS = 256


def split_windows(batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) uint8 windows -> inputs and next-token targets, each (B, T) int64."""
    batch = batch.to(device, non_blocking=True).long()
    return batch[:, :-1], batch[:, 1:]


def next_token_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.inference_mode()
def evaluate(model: nn.Module, windows: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Token-averaged loss, its perplexity, and top-1 accuracy over all windows."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    tokens = 0
    for start in range(0, len(windows), EVAL_BATCH_WINDOWS):
        x, y = split_windows(windows[start : start + EVAL_BATCH_WINDOWS], device)
        logits = model(x)
        loss_sum += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        correct += (logits.argmax(-1) == y).sum()
        tokens += y.numel()
    model.train(was_training)
    loss = float(loss_sum) / max(tokens, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(loss), "eval_acc": int(correct) / max(tokens, 1)}
