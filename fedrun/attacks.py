"""Model-poisoning attacks, so that robust aggregation can be measured.

A fixed fraction of the population, drawn once from the seed, is malicious; each malicious
client replaces its honest update before sending it:
- sign_flip: -scale * delta (Damaskinos et al. 2018; Li et al. 2019, "RSA")
- scale:      scale * delta (boosting, Bhagoji et al. 2019)
- gaussian:   a random N(0, scale^2) vector (Fang et al. 2020's Gaussian attack)
"""
from __future__ import annotations

import math
from typing import Annotated

import torch

from fedrun.components import OneOf, Range
from fedrun.core import ClientUpdate, RoundContext, Stream, numpy_rng, torch_generator

KINDS = ("sign_flip", "scale", "gaussian")


class NoAttack:
    """`attack=none`: every client is honest."""

    is_noop = True
    malicious: frozenset[int] = frozenset()

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        return update


class ModelPoisoning:
    """A fixed `fraction` of the population, drawn from the seed, sends a poisoned update.

    `scale` multiplies the update (sign_flip, scale) or is the noise's standard deviation
    (gaussian): a finite number >= 0 (a negative one would turn sign_flip into scale and back)."""

    def __init__(self, *, kind: Annotated[str, OneOf(*KINDS)], fraction: Annotated[float, Range(ge=0, le=1)],
                 scale: Annotated[float, Range(ge=0, lt=math.inf, words="a finite number >= 0")],
                 num_clients: int, seed: int):
        self.kind, self.fraction, self.scale = kind, fraction, scale
        self.num_clients, self.seed = num_clients, seed
        count = int(round(fraction * num_clients))
        chosen = numpy_rng(seed, Stream.ATTACK).choice(num_clients, size=count, replace=False)
        self.malicious = frozenset(int(c) for c in chosen)

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        if update.client_id not in self.malicious:
            return update
        update.delta = self.poison(update.delta, ctx, update.client_id)
        update.malicious = True
        return update

    def poison(self, delta: torch.Tensor, ctx: RoundContext, client_id: int) -> torch.Tensor:
        if self.kind == "sign_flip":
            return -self.scale * delta
        if self.kind == "scale":
            return self.scale * delta
        g = torch_generator(ctx.seed, Stream.ATTACK, ctx.round_idx, client_id)
        return self.scale * torch.randn(delta.shape, generator=g).to(delta.device, delta.dtype)
