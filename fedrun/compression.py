"""Update compression: client-side hooks that shrink what a client sends.

- `TopK`: sparsification to the k = ceil(fraction * D) largest-magnitude coordinates, with
  error feedback (Stich et al. 2018, "Sparsified SGD with Memory"; Karimireddy et al. 2019,
  "Error Feedback Fixes SignSGD"): what a client does not send is kept as a residual and
  added to its next update, so no part of any update is lost, only delayed.
- `StochasticQuantizer`: uniform quantisation to 2^bits levels between the update's min and
  max, with unbiased stochastic rounding (the rounding of QSGD, Alistarh et al. 2017, but on
  a min-max grid instead of QSGD's norm-scaled one: every level is usable whatever the sign
  balance of the update, at the price of a second float32 on the wire).

The simulation aggregates dense vectors, so each hook replaces `update.delta` with the dense
vector the server decodes; `update.bytes_up` counts what is actually sent. Bytes the update
carried besides its dense float32 delta (e.g. SCAFFOLD's control delta) are kept.
"""
from __future__ import annotations

import math
from typing import Annotated

import torch

from fedrun.components import Range
from fedrun.core import ClientUpdate, FedrunError, RoundContext, Stream, torch_generator

QUANTIZE_KEY = 7  # extra key of the quantiser's stream, after (round, client), within Stream.CLIENT
INDEX_BYTES = 4  # int32 index of each sent coordinate
SCALE_BYTES = 8  # the quantiser's (min, max) as two float32


def _extra_bytes(update: ClientUpdate) -> int:
    """Bytes sent besides the dense delta. Compression must see the dense float32 delta; a
    bytes_up below the dense size shows (not always: large fractions) it was compressed already."""
    if not update.delta.is_floating_point():
        raise FedrunError("compression: the update is already masked; compress before secure aggregation")
    extra = update.bytes_up - update.delta.numel() * update.delta.element_size()
    if extra < 0:
        raise FedrunError(f"compression: update of client {update.client_id} is already smaller than its "
                          "dense delta; apply one compression only")
    return extra


class NoCompression:
    """`compression=none`: updates are sent as dense float32 vectors."""

    is_noop = True

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        return update

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TopK:
    """Top-k sparsification with error feedback; residuals persist per client across rounds."""

    def __init__(self, *, fraction: Annotated[float, Range(gt=0, le=1)], num_clients: int) -> None:
        self.fraction = fraction
        self.num_clients = num_clients
        self.residual: dict[int, torch.Tensor] = {}  # client_id -> (D,) what it has not sent yet

    def k(self, dim: int) -> int:
        # the 1e-9 keeps float error (0.3 * 10 = 3.0000000000000004) from adding a coordinate
        return max(1, min(dim, math.ceil(self.fraction * dim - 1e-9)))

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        if not 0 <= update.client_id < self.num_clients:
            raise FedrunError(f"compression: client id {update.client_id} outside [0, {self.num_clients})")
        extra = _extra_bytes(update)
        delta = update.delta
        old = self.residual.get(update.client_id)
        acc = delta if old is None else delta + old.to(delta.device)  # (D,)
        k = self.k(acc.numel())
        idx = torch.topk(acc.abs(), k, sorted=False).indices  # (k,)
        sent = torch.zeros_like(acc)
        sent[idx] = acc[idx]
        residual = acc.clone()
        residual[idx] = 0.0  # sent + residual == acc exactly: each coordinate is in one of them
        self.residual[update.client_id] = residual
        update.delta = sent
        update.bytes_up = k * (delta.element_size() + INDEX_BYTES) + extra
        return update

    def state_dict(self) -> dict:
        return {"residual": {c: r.detach().cpu().clone() for c, r in self.residual.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.residual = {int(c): r.clone() for c, r in state["residual"].items()}


class StochasticQuantizer:
    """Uniform stochastic quantisation to 2^bits levels on [min(delta), max(delta)].

    A coordinate x with t = (x - lo) / step between levels j and j+1 goes to j+1 with
    probability t - j, else to j: E[decoded] = x, Var = step^2 (t - j)(1 - t + j).
    """

    def __init__(self, *, bits: Annotated[int, Range(ge=1, le=16)]) -> None:
        self.bits = bits

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        extra = _extra_bytes(update)
        gen = torch_generator(ctx.seed, Stream.CLIENT, ctx.round_idx, update.client_id, QUANTIZE_KEY)
        update.delta = self.quantize(update.delta, gen)
        dim = update.delta.numel()
        update.bytes_up = math.ceil(dim * self.bits / 8) + SCALE_BYTES + extra
        return update

    def quantize(self, delta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The decoded (D,) vector; the levels j (what is sent) are not kept."""
        lo, hi = delta.min(), delta.max()
        levels = 2**self.bits - 1  # intervals between the 2^bits grid points
        step = (hi - lo) / levels
        if step == 0:  # constant vector: (lo, hi) alone describe it
            return delta.clone()
        t = (delta - lo) / step  # (D,) in [0, levels]
        floor = t.floor()
        # uniforms drawn on the CPU so that the draw does not depend on the device
        u = torch.rand(delta.shape, generator=gen).to(delta.device, delta.dtype)
        j = (floor + (u < t - floor).to(delta.dtype)).clamp_(0, levels)
        return lo + j * step

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
