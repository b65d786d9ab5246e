"""Example-level DP-SGD for a client's local training (Abadi et al. 2016, "Deep Learning with
Differential Privacy").

One step: each example's gradient is clipped to L2 norm C over all parameters jointly, the
clipped gradients are summed, Gaussian noise N(0, (z C)^2) is added to every coordinate and the
sum is divided by the *expected* batch size q N, opacus' convention for Poisson sampling, which
is what the accountant assumes (`poisson_batches`, `client_epsilon`).

Per-example gradients come from the functional route that opacus itself uses for layers without
a hand-written grad sampler: `torch.func.vmap` over `grad` of the loss of one example, with the
model's trainable parameters passed through `functional_call`. Unlike opacus' hooks
(`GradSampleModule`) this needs no per-layer rules, so any model whose forward works on a batch
of one is supported as is (TinyGPT's batchless position embedding included), tied weights are
handled by `functional_call`, and nothing touches the parameters' `.grad`: the result is written
into the caller's flat gradient buffer.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from fedrun.core import FedrunError
from fedrun.evaluation import batch_loss
from fedrun.privacy.accounting import epsilon_of

ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class ExampleDP:
    """Example-level DP-SGD on the client (privacy=local_dp): Poisson batches of expected size
    client.batch_size, per-example clipping to max_grad_norm, Gaussian noise."""

    max_grad_norm: float
    noise_multiplier: float
    noise_source: str = "seed"  # or "os": the noise is not reproducible from the run's seed


class DPSGDStep:
    """Computes the DP gradient of one batch into a flat gradient buffer; built once per worker.

    `max_physical_batch` bounds memory: per-example gradients (B x D floats) are materialised
    for at most that many examples at a time.
    """

    def __init__(self, model: nn.Module, *, max_grad_norm: float, noise_multiplier: float,
                 max_physical_batch: int | None = None, noise_source: str = "seed"):
        if not max_grad_norm > 0:
            raise FedrunError(f"local_dp.max_grad_norm: must be > 0, got {max_grad_norm}")
        if not noise_multiplier >= 0:
            raise FedrunError(f"local_dp.noise_multiplier: must be >= 0, got {noise_multiplier}")
        check_supported(model)
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.max_physical_batch = max_physical_batch
        self.noise_source = noise_source  # "os": noise from os.urandom-seeded streams (fedrun.privacy.randomness)
        # (name, offset, numel) in the order of `[p for p in model.parameters() if p.requires_grad]`,
        # the order of the flat buffers; named_parameters() lists a tied tensor once, as that does.
        self.layout: list[tuple[str, int, int]] = []
        offset = 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.layout.append((name, offset, p.numel()))
                offset += p.numel()
        self.num_params = offset
        # vmap over one example's gradient; each example draws its own dropout masks.
        self._per_example = vmap(grad_and_value(self._example_loss), in_dims=(None, 0, 0),
                                 randomness="different")

    def compute(self, x: torch.Tensor, y: torch.Tensor, *, flat_grad: torch.Tensor,
                generator: torch.Generator, expected_batch_size: int) -> float:
        """Fill `flat_grad` with (sum_i clip(g_i) + N(0, (z C)^2 I)) / expected_batch_size.

        Returns the mean loss over the batch's examples (nan for an empty batch, which gets
        noise only). The noise is drawn from `generator` alone, so it is reproducible; with
        noise_source "os" from a stream seeded by os.urandom instead (not reproducible).
        """
        if flat_grad.numel() != self.num_params:
            raise ValueError(f"flat_grad has {flat_grad.numel()} entries; the model has "
                             f"{self.num_params} trainable parameters")
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        flat_grad.zero_()
        loss_sum = torch.zeros((), device=flat_grad.device)
        if len(x):  # an empty Poisson batch gets noise only
            chunk = self.max_physical_batch or len(x)
            for xs, ys in zip(x.split(chunk), y.split(chunk)):
                loss_sum += self._add_clipped_sum(xs, ys, flat_grad)
        if self.noise_multiplier > 0:
            if self.noise_source == "os":
                generator = torch.Generator(generator.device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
            noise = torch.randn(self.num_params, generator=generator, device=generator.device)
            flat_grad.add_(noise.to(flat_grad.device), alpha=self.noise_multiplier * self.max_grad_norm)
        flat_grad.div_(expected_batch_size)
        return float(loss_sum) / len(x) if len(x) else math.nan

    def _add_clipped_sum(self, x: torch.Tensor, y: torch.Tensor, flat_grad: torch.Tensor) -> torch.Tensor:
        """Add sum_i g_i * min(1, C / ||g_i||) to `flat_grad`; return the examples' summed loss."""
        grads, losses = self.per_example_gradients(x, y)  # {name: (B, *shape)}, (B,)
        # (B,); a Tensor, not sum()'s start 0, as the model has trainable parameters
        sq_norms = cast(torch.Tensor, sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
        scale = (self.max_grad_norm / sq_norms.sqrt()).clamp(max=1.0)  # C / 0 = inf -> 1
        for name, offset, n in self.layout:
            flat_grad[offset : offset + n] += scale @ grads[name].reshape(len(scale), n)
        return losses.detach().sum()

    def per_example_gradients(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Each example's gradient of its own loss, {name: (B, *param.shape)}, and the (B,) losses."""
        params = {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}
        try:
            # The math attention kernel is plain tensor ops that vmap batches; the fused
            # kernels have no batching rule and would fall back to a slow loop.
            with sdpa_kernel(SDPBackend.MATH):
                return self._per_example(params, x, y)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise FedrunError(f"local_dp: no per-example gradients for model {type(self.model).__name__} "
                              f"(torch.func.vmap failed): {e}") from e

    def _example_loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss of one example, run as a batch of one: x (...) -> (1, ...)."""
        model = lambda inputs: functional_call(self.model, params, (inputs,))  # noqa: E731
        return batch_loss(model, x.unsqueeze(0), y.unsqueeze(0))


def check_supported(model: nn.Module) -> None:
    """Refuse models whose per-example gradients are undefined or that vmap cannot batch."""
    name = type(model).__name__
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise FedrunError(f"local_dp: model {name} uses BatchNorm, which mixes the examples of a "
                              "batch, so per-example gradients (and DP-SGD) are undefined; use GroupNorm "
                              "or LayerNorm")
        on_cuda = any(p.is_cuda for p in module.parameters(recurse=False))
        if isinstance(module, nn.RNNBase) and on_cuda:
            raise FedrunError(f"local_dp: model {name} uses torch.nn.{type(module).__name__}, whose cuDNN "
                              "kernel has no per-example gradients on CUDA (vmap cannot batch it); build "
                              f"the model with opacus.layers.DP{type(module).__name__} in its place, or train on CPU")


def poisson_batches(num_examples: int, *, sample_rate: float, num_steps: int,
                    generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`num_steps` batches of example indices, each example in each independently with
    probability `sample_rate`, as the accountant assumes; a batch may be empty."""
    if not 0 < sample_rate <= 1:
        raise FedrunError(f"local_dp.sample_rate: must be in (0, 1], got {sample_rate}")
    for _ in range(num_steps):
        yield torch.nonzero(torch.rand(num_examples, generator=generator) < sample_rate).flatten()


def client_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                   accountant: str = "rdp") -> float:
    """epsilon at `delta` of `steps` DP-SGD steps with Poisson rate `sample_rate`, from opacus'
    RDP accountant (Mironov 2017) or PRV accountant (Gopi et al. 2021)."""
    if accountant not in ACCOUNTANTS:
        raise FedrunError(f"local_dp.accountant: unknown accountant {accountant!r}; "
                          f"allowed: {', '.join(ACCOUNTANTS)}")
    if steps == 0:
        return 0.0
    return epsilon_of(Counter({(noise_multiplier, sample_rate): steps}), delta, accountant=accountant)
