"""Client samplers: which clients take part in a round, drawn from the round's own stream.

- uniform: a fixed number of clients, uniformly without replacement (McMahan et al. 2017).
- poisson: each client independently with rate q = clients_per_round / num_clients, the
  sampling that privacy amplification by subsampling assumes (Abadi et al. 2016).
- weighted: a fixed number without replacement, with probability proportional to examples.
Dropout then removes each sampled client independently with probability `dropout`: it was
sent the model but never reports (Bonawitz et al. 2019, "Towards Federated Learning at Scale").
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrun.core import RoundContext, Stream, numpy_rng

KINDS = ("uniform", "poisson", "weighted")


@dataclass
class UniformSampler:
    clients_per_round: int
    dropout: float = 0.0

    def sample(self, num_examples: np.ndarray, ctx: RoundContext) -> list[int]:
        rng = numpy_rng(ctx.seed, Stream.SAMPLE, ctx.round_idx)
        return sorted(rng.choice(len(num_examples), size=self.clients_per_round, replace=False).tolist())


@dataclass
class PoissonSampler:
    clients_per_round: int  # the expected cohort size q * N
    dropout: float = 0.0

    def rate(self, num_clients: int) -> float:
        return self.clients_per_round / num_clients

    def sample(self, num_examples: np.ndarray, ctx: RoundContext) -> list[int]:
        rng = numpy_rng(ctx.seed, Stream.SAMPLE, ctx.round_idx)
        return np.flatnonzero(rng.random(len(num_examples)) < self.rate(len(num_examples))).tolist()


@dataclass
class WeightedSampler:
    clients_per_round: int
    dropout: float = 0.0

    def sample(self, num_examples: np.ndarray, ctx: RoundContext) -> list[int]:
        rng = numpy_rng(ctx.seed, Stream.SAMPLE, ctx.round_idx)
        p = num_examples / num_examples.sum()
        return sorted(rng.choice(len(num_examples), size=self.clients_per_round, replace=False, p=p).tolist())


def make_sampler(*, kind: str, clients_per_round: int, dropout: float):
    """`sampler=default`: the sampler named by `sampler.kind`."""
    samplers = {"uniform": UniformSampler, "poisson": PoissonSampler, "weighted": WeightedSampler}
    return samplers[kind](clients_per_round=clients_per_round, dropout=dropout)


def drop_out(cohort: list[int], rate: float, ctx: RoundContext) -> tuple[list[int], list[int]]:
    """Split the cohort into clients that report and clients that fail before reporting."""
    if rate == 0 or not cohort:
        return list(cohort), []
    fails = numpy_rng(ctx.seed, Stream.DROPOUT, ctx.round_idx).random(len(cohort)) < rate
    return [c for c, f in zip(cohort, fails) if not f], [c for c, f in zip(cohort, fails) if f]
