"""A model's loss and gradients over a stack of clients' flat weights (K, D), in one call.

`torch.func.functional_call` runs the reused model with one client's flat row cut into
parameter views; `torch.func.vmap` batches that over the rows, so K clients' forward and
backward passes become one set of batched tensor ops (the idea of FedJAX, Ro et al. 2021,
"FedJAX: Federated learning simulation with JAX", on CPU with torch.func).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode


# Fewer rows than this train one after another on the plain model: vmap's fixed cost per call
# (a few ms on CPU) is more than a small model's step, so batching 1-3 clients loses time.
LOOP_BELOW = 4


class StackedModel:
    """Per-client losses and gradients of `model` for a (K, D) stack of flat weights.

    Row layout is fedrun's flat vector: the trainable parameters in `model.parameters()` order
    (a tied tensor once; functional_call re-ties it). Frozen parameters and buffers are the
    model's own. Only the model's forward pass is vmapped; the loss is computed on the (K, ...)
    logits with plain ops, and ordinary autograd differentiates the sum of the K losses, which
    gives each row its own client's gradient (rows do not interact) with plain batched kernels."""

    def __init__(self, model: nn.Module, *, flat: torch.Tensor, flat_grad: torch.Tensor):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model, self.flat, self.flat_grad = model, flat, flat_grad  # LocalTrainer's buffers
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self._forward = vmap(lambda params, x: functional_call(model, params, (x,)))
        self._attention: bool | None = None  # does the model call attention? (known after one call)
        self.vmapped = False  # has vmap run this model successfully?

    def gradients(self, stack: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, D) gradients and (K,) losses for rows `stack` (K, D) on batches x (K, B, ...),
        y (K, B, ...) with example weights (K, B): 1 for a real example, 0 for padding."""
        if len(stack) < LOOP_BELOW:
            return self._one_by_one(stack, x, y, weight)
        rows = stack.detach().requires_grad_()
        with torch.enable_grad():
            losses = client_losses(self._batched(rows, x), y, weight)
        (grad,) = torch.autograd.grad(losses.sum(), rows)
        return grad, losses.detach()

    def _batched(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        k = rows.shape[0]
        params = {n: t.view(k, *s) for n, t, s in zip(self.names, rows.split(self.sizes, dim=1), self.shapes)}
        mode = _BatchedAttention() if self._attention is not False else contextlib.nullcontext()
        with mode:
            logits = self._forward(params, x)
        if self._attention is None:
            self._attention = mode.seen
        self.vmapped = True
        return logits

    def _one_by_one(self, stack: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same gradients, row after row, on the model itself (its parameters are views of
        `flat`, its gradients of `flat_grad`)."""
        grads, losses = torch.empty_like(stack), torch.empty(len(stack), device=stack.device)
        for k in range(len(stack)):
            self.flat.copy_(stack[k])
            self.flat_grad.zero_()
            with torch.enable_grad():
                loss = client_losses(self.model(x[k]).unsqueeze(0), y[k : k + 1], weight[k : k + 1])[0]
                loss.backward()
            grads[k], losses[k] = self.flat_grad, loss.detach()
        return grads, losses


def client_losses(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(K,) each client's mean over its real examples of each example's mean cross-entropy,
    which is `batch_loss` on its real examples alone (every example has as many targets)."""
    k, b = weight.shape
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return (ce.view(k, b, -1).mean(2) * weight).sum(1) / weight.sum(1)


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

    seen = False  # whether the model called attention

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and len(args) == 3 and _plain_attention(kwargs):
            self.seen = True
            return _MergedAttention.apply(*args[:3], kwargs.get("is_causal", False), kwargs.get("scale"))
        return func(*args, **kwargs)


def _plain_attention(kwargs: dict) -> bool:
    """Attention without a mask or dropout: what `_MergedAttention` reproduces exactly."""
    return kwargs.get("attn_mask") is None and not kwargs.get("dropout_p") and not kwargs.get("enable_gqa")
