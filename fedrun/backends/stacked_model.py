"""A model's loss and gradients over a stack of clients' flat weights (K, D), in one call.

`torch.func.functional_call` runs the reused model with the rows cut into stacked parameter
views (K, *shape); two ways batch it over the rows, so K clients' forward and backward passes
become one set of batched tensor ops (the idea of FedJAX, Ro et al. 2021, "FedJAX: Federated
learning simulation with JAX", on CPU with torch):
- grouped matmuls, for models made only of linear layers and elementwise ops (`groupable`):
  each linear layer is one `baddbmm` of the K clients' inputs (K, B, in) with their weights
  (K, out, in), and elementwise ops act on (K, B, ...) as they do on (B, ...). The forward is
  traced once with torch.fx and its linear layers rewritten (`grouped_forward`); a model fx
  cannot trace runs under a mode that rewrites each `F.linear` call instead;
- `torch.func.vmap` over the rows, for any other model vmap can batch. It costs more per call
  (~0.5 ms on CPU: it wraps every op), which on small models is most of a step.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap
from torch.overrides import TorchFunctionMode

from fedrun.data.examples import IGNORE

# Fewer rows than this train one after another on the plain model: a batched call's fixed cost
# is more than a small model's step, so batching 1-3 clients by vmap, or one by grouped
# matmuls, loses time.
LOOP_BELOW = {"vmap": 4, "grouped": 2}

# The rows' gradient views are strided like the rows' parameter views (a column block of the
# (K, D) buffer); autograd warns that such a `.grad` is not contiguous, then accumulates into it
# in place all the same, which is what StackedModel wants.
warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")

# Modules whose forward acts on the last axis or elementwise, so the same code is right on
# (K, B, ...) inputs; a model class may declare the same of its own forward (`elementwise_forward`).
GROUPABLE = (nn.Linear, nn.Sequential, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
             nn.ELU, nn.Softplus, nn.Dropout)


def groupable(model: nn.Module) -> bool:
    """Whether every module of the model is a linear layer, an elementwise op or a container
    that only chains them, so it runs on stacked weights by grouped matmuls."""
    return all(isinstance(m, GROUPABLE) or getattr(type(m), "elementwise_forward", False) for m in model.modules())


class StackedModel:
    """Per-client losses and gradients of `model` for a (K, D) stack of flat weights.

    Row layout is fedrun's flat vector: the trainable parameters in `model.parameters()` order
    (a tied tensor once; functional_call re-ties it). Frozen parameters and buffers are the
    model's own. Only the model's forward pass is batched; the loss is computed on the (K, ...)
    logits with plain ops, and ordinary autograd differentiates the sum of the K losses, which
    gives each row its own client's gradient (rows do not interact) with plain batched kernels.
    The stacked parameters are leaves whose `.grad` are views into one (K, D) buffer, so
    backward accumulates straight into the rows' gradients, with no gather at the end."""

    def __init__(self, model: nn.Module, *, flat: torch.Tensor, flat_grad: torch.Tensor):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model, self.flat, self.flat_grad = model, flat, flat_grad  # LocalTrainer's buffers
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.bounds = torch.tensor([0] + [p.numel() for _, p in named]).cumsum(0).tolist()
        self.mode = "grouped" if groupable(model) else "vmap"
        self._vmapped = vmap(lambda params, x: functional_call(model, params, (x,)))
        self._attention: bool | None = None  # does the model call attention? (known after one call)
        self.vmapped = False  # has the model run batched successfully?
        self._grad = torch.zeros(0, flat.numel(), device=flat.device)  # rows' gradients, grown as needed
        self._cached: tuple[tuple[int, int], dict[str, torch.Tensor]] | None = None  # the last rows' leaves
        # Where each trainable parameter sits, tied ones at every place, and its one name: the
        # traced forward looks the stacked leaves up by that name, and the untraced grouped
        # forward swaps them in there directly (functional_call's general machinery costs more
        # than a small model's whole step).
        first: dict[int, str] = {}
        self._slots = [(module, attr, first.setdefault(id(p), f"{prefix}.{attr}".lstrip(".")))
                       for prefix, module in model.named_modules(remove_duplicate=False)
                       for attr, p in module._parameters.items() if p is not None and p.requires_grad]
        self._traced = grouped_forward(model, first) if self.mode == "grouped" else None

    def gradients(self, stack: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, D) gradients and (K,) losses for rows `stack` (K, D) on batches x (K, B, ...),
        y (K, B, ...) whose examples weigh `share` (K, B): 1 / a batch's size, 0 for padding.
        The gradients are a buffer the next call overwrites."""
        if len(stack) < LOOP_BELOW[self.mode]:
            return self._one_by_one(stack, x, y, share)
        params, grad = self._leaves(stack)
        with torch.enable_grad():
            ce = example_losses(self._forward(params, x), y, share.numel())
            # The sum of the clients' mean losses as one dot product: a row's gradient is its
            # own client's, and backward has two nodes fewer than weighting and summing would.
            torch.dot(ce, share.reshape(-1)).backward()
        return grad, (ce.detach().view(share.shape) * share).sum(1)

    def _leaves(self, stack: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Parameter views of the rows (K, *shape), as leaves whose gradients are views of a
        zeroed (K, D) buffer (backward accumulates into an existing `.grad` in place). The
        optimizer steps the rows in place, so the leaves of the same rows serve every step."""
        k = len(stack)
        if len(self._grad) < k:
            self._grad = torch.zeros_like(stack)
            self._cached = None
        grad = self._grad[:k]
        grad.zero_()
        key = (stack.data_ptr(), k)  # the cached leaves keep their rows' storage alive
        if self._cached is None or self._cached[0] != key:
            params = {}
            for name, shape, lo, hi in zip(self.names, self.shapes, self.bounds, self.bounds[1:]):
                leaf = stack[:, lo:hi].detach().view(k, *shape).requires_grad_()
                leaf.grad = grad[:, lo:hi].view(k, *shape)
                params[name] = leaf
            self._cached = key, params
        return self._cached[1], grad

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self._traced is not None:
            logits = self._traced(x, params)
        elif self.mode == "grouped":
            with self._swapped(params), _GroupedLinear():
                logits = self.model(x)
        else:
            mode = _BatchedAttention() if self._attention is not False else contextlib.nullcontext()
            with mode:
                logits = self._vmapped(params, x)
            if self._attention is None:
                assert isinstance(mode, _BatchedAttention)  # not yet known: the batched attention ran
                self._attention = mode.seen
        self.vmapped = True
        return logits

    @contextlib.contextmanager
    def _swapped(self, params: dict[str, torch.Tensor]):
        """The model with `params` in place of its trainable parameters, then its own again."""
        own = [module._parameters[attr] for module, attr, _ in self._slots]
        try:
            for module, attr, name in self._slots:
                module._parameters[attr] = params[name]
            yield
        finally:
            for (module, attr, _), p in zip(self._slots, own):
                module._parameters[attr] = p

    def _one_by_one(self, stack: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same gradients, row after row, on the model itself (its parameters are views of
        `flat`, its gradients of `flat_grad`)."""
        grads, losses = torch.empty_like(stack), torch.empty(len(stack), device=stack.device)
        for k in range(len(stack)):
            self.flat.copy_(stack[k])
            self.flat_grad.zero_()
            with torch.enable_grad():
                loss = torch.dot(example_losses(self.model(x[k]), y[k], share.shape[1]), share[k])
                loss.backward()
            grads[k], losses[k] = self.flat_grad, loss.detach()
        return grads, losses


class _GroupedLinear(TorchFunctionMode):
    """`F.linear` with stacked weights (K, out, in) as one grouped matmul of the clients'
    inputs (K, B, in), while StackedModel runs a groupable model."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[1].dim() == 3:
            return clients_linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"))
        return func(*args, **kwargs)


def clients_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear layer of K clients: their inputs (K, B, in) by their weights (K, out, in)."""
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))  # (K, B, out)


def grouped_linear(x: torch.Tensor, params: dict[str, torch.Tensor], weight: str, bias: str | None) -> torch.Tensor:
    """`clients_linear` with the layer's stacked parameters looked up by name (the traced forward's call)."""
    return clients_linear(x, params[weight], None if bias is None else params[bias])


def grouped_forward(model: nn.Module, names: dict[int, str]) -> Callable | None:
    """The groupable model's forward as one traced function of (x, stacked params), each linear
    layer a `grouped_linear` call: no module swapping and no per-op mode, which on a light
    client's step cost as much as the arithmetic. None where torch.fx cannot trace the model
    or its forward reads a parameter itself (the mode then does the work)."""
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception:
        return None
    graph = traced.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1 or any(n.op == "get_attr" for n in graph.nodes):
        return None
    with graph.inserting_after(inputs[0]):
        params = graph.placeholder("params")
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(layer := traced.get_submodule(node.target), nn.Linear):
            if any(p is not None and id(p) not in names for p in (layer.weight, layer.bias)):
                return None  # a frozen layer: its weights are not in the stack
            bias = None if layer.bias is None else names[id(layer.bias)]
            with graph.inserting_before(node):
                grouped = graph.call_function(grouped_linear, (node.args[0], params, names[id(layer.weight)], bias))
            node.replace_all_uses_with(grouped)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    traced.recompile()
    return traced


def example_losses(logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) each of n examples' cross-entropy (a sequence's: the mean over its tokens), for
    logits (..., C) and targets (...) whose leading dims hold the examples. Weighted by
    1 / batch size (instruction examples: by their share of the batch's counted targets,
    vectorized.pad_steps), a client's sum to `batch_loss` on its real examples."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    if ce.numel() == n:
        return ce
    per_token = ce.view(n, -1)
    counted = y.reshape(n, -1) != IGNORE
    # An instruction example's loss is the mean over its counted (response) tokens; chosen per
    # row with `where`, not by asking the device whether any target is ignored (a sync a step).
    masked = per_token.sum(1) / counted.sum(1).clamp(min=1)
    return torch.where(counted.all(1), per_token.mean(1), masked)


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
