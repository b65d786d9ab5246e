"""Model-poisoning attacks, so that robust aggregation can be measured.

A fixed fraction of the population, drawn once from the seed, is malicious; each malicious
client replaces its honest update before sending it:
- sign_flip: -scale * delta (Damaskinos et al. 2018; Li et al. 2019, "RSA")
- scale:      scale * delta (boosting, Bhagoji et al. 2019)
- gaussian:   a random N(0, scale^2) vector (Fang et al. 2020's Gaussian attack)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedrun.core import ClientUpdate, RoundContext, Stream, numpy_rng, torch_generator

KINDS = ("sign_flip", "scale", "gaussian")


class NoAttack:
    malicious: frozenset[int] = frozenset()

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        return update


@dataclass
class ModelPoisoning:
    kind: str
    fraction: float
    scale: float
    num_clients: int
    seed: int
    malicious: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        count = int(round(self.fraction * self.num_clients))
        chosen = numpy_rng(self.seed, Stream.ATTACK).choice(self.num_clients, size=count, replace=False)
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
