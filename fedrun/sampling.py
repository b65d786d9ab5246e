"""Client samplers: which clients take part in a round, drawn from the round's own stream."""
from __future__ import annotations

from dataclasses import dataclass

from fedrun.core import RoundContext, Stream, numpy_rng


@dataclass
class UniformSampler:
    """A fixed number of clients, uniformly without replacement."""

    clients_per_round: int

    def sample(self, num_clients: int, ctx: RoundContext) -> list[int]:
        rng = numpy_rng(ctx.seed, Stream.SAMPLE, ctx.round_idx)
        return sorted(rng.choice(num_clients, size=self.clients_per_round, replace=False).tolist())
