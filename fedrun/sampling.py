"""Client samplers: which clients take part in a round, drawn from the round's own stream.

- uniform: a fixed number of clients, uniformly without replacement (McMahan et al. 2017).
- poisson: each client independently with rate q = clients_per_round / num_clients, the
  sampling that privacy amplification by subsampling assumes (Abadi et al. 2016).
- weighted: a fixed number without replacement, with probability proportional to examples.
Dropout then removes each sampled client independently with probability `dropout`: it was
sent the model but never reports (Bonawitz et al. 2019, "Towards Federated Learning at Scale").
"""
from __future__ import annotations

from typing import Annotated

import numpy as np

from fedrun.components import OneOf, Range
from fedrun.core import RoundContext, Stream, numpy_rng

KINDS = ("uniform", "poisson", "weighted")


class ClientSampler:
    """`sampler=default`: each round's cohort, drawn the way `kind` says, from the round's stream."""

    def __init__(self, *, kind: Annotated[str, OneOf(*KINDS)], clients_per_round: Annotated[int, Range(ge=1)],
                 dropout: Annotated[float, Range(ge=0, lt=1)]):
        self.kind = kind
        self.clients_per_round = clients_per_round  # poisson: the expected cohort size q * N
        self.dropout = dropout  # read by the round loop (drop_out)

    def rate(self, num_clients: int) -> float:
        """poisson's sampling rate q."""
        return self.clients_per_round / num_clients

    def sample(self, num_examples: np.ndarray, ctx: RoundContext) -> list[int]:
        """The sampled clients' ids, ascending; `num_examples` holds every client's examples."""
        rng = numpy_rng(ctx.seed, Stream.SAMPLE, ctx.round_idx)
        n = len(num_examples)
        if self.kind == "poisson":
            return np.flatnonzero(rng.random(n) < self.rate(n)).tolist()
        p = num_examples / num_examples.sum() if self.kind == "weighted" else None
        return sorted(rng.choice(n, size=self.clients_per_round, replace=False, p=p).tolist())


def drop_out(cohort: list[int], rate: float, ctx: RoundContext) -> tuple[list[int], list[int]]:
    """Split the cohort into clients that report and clients that fail before reporting."""
    if rate == 0 or not cohort:
        return list(cohort), []
    fails = numpy_rng(ctx.seed, Stream.DROPOUT, ctx.round_idx).random(len(cohort)) < rate
    return [c for c, f in zip(cohort, fails) if not f], [c for c, f in zip(cohort, fails) if f]
