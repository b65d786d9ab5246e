"""A model's loss and gradients over a stack of clients' flat weights (K, D), in one call.

`torch.func.functional_call` runs the reused model with one client's flat row cut into
parameter views; `torch.func.vmap` batches that over the rows, so K clients' forward and
backward passes become one set of batched tensor ops (the idea of FedJAX, Ro et al. 2021,
"FedJAX: Federated learning simulation with JAX", on CPU with torch.func).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode


class StackedModel:
    """Per-client losses and gradients of `model` for a (K, D) stack of flat weights.

    Row layout is fedrun's flat vector: the trainable parameters in `model.parameters()` order
    (a tied tensor once; functional_call re-ties it). Frozen parameters and buffers are the
    model's own. Only the forward pass is vmapped; ordinary autograd then differentiates the
    sum of the K losses, which gives each row its own client's gradient (rows do not interact)
    with plain batched kernels in the backward pass."""

    def __init__(self, model: nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model = model
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self._losses = vmap(self.client_loss)

    def client_loss(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
        """One client's loss: the mean over its real examples (weight 1; padding 0) of each
        example's mean cross-entropy, which is `batch_loss` on the real examples alone."""
        params = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}
        logits = functional_call(self.model, params, (x,))  # (B, ..., C)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        return (ce.view(weight.shape[0], -1).mean(1) * weight).sum() / weight.sum()

    def gradients(self, stack: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, D) gradients and (K,) losses for rows `stack` (K, D) on batches x (K, B, ...),
        y (K, B, ...) with example weights (K, B)."""
        rows = stack.detach().requires_grad_()
        with torch.enable_grad(), _BatchedAttention():
            losses = self._losses(rows, x, y, weight)
        (grad,) = torch.autograd.grad(losses.sum(), rows)
        return grad, losses.detach()


class _MergedAttention(torch.autograd.Function):
    """`scaled_dot_product_attention` under vmap, which has no batching rule for it on CPU:
    attention has no parameters, so the clients' axis simply joins the batch axis and K
    clients' attention is one call of the same kernel on K*B sequences."""

    @staticmethod
    def forward(q, k, v, is_causal, scale):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("StackedModel differentiates outside vmap, through the merged call's own ops")

    @staticmethod
    def vmap(info, in_dims, q, k, v, is_causal, scale):
        n = info.batch_size
        q, k, v = (t.movedim(d, 0) if d is not None else t.expand(n, *t.shape) for t, d in zip((q, k, v), in_dims))
        y = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                           is_causal=is_causal, scale=scale)
        return y.unflatten(0, (n, -1)), 0


class _BatchedAttention(TorchFunctionMode):
    """Routes the model's attention calls to `_MergedAttention` while StackedModel runs it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and _plain_attention(kwargs):
            return _MergedAttention.apply(*args[:3], kwargs.get("is_causal", False), kwargs.get("scale"))
        return func(*args, **kwargs)


def _plain_attention(kwargs: dict) -> bool:
    """Attention without a mask or dropout: what `_MergedAttention` reproduces exactly."""
    return kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and not kwargs.get("enable_gqa")
