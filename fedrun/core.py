"""Small records and protocols shared by every part of fedrun, and the seeding helpers.

Updates are flat float32 vectors over the trainable parameters (`delta = local - global`);
aggregation, clipping, noise and compression are then a few vector operations.
Randomness is derived, never carried: every stream is seeded from
`(seed, purpose, round, client)`, so results do not depend on execution order or on the
backend, and a resumed run needs no RNG state beyond the seed.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch


class FedrunError(Exception):
    """An error the user can fix: the CLI prints it as one line (no traceback) and exits 2."""


class Stream(enum.IntEnum):
    """The purpose of a random stream; part of every derived seed."""

    INIT = 1  # initial global model
    SAMPLE = 2  # which clients take part in a round
    CLIENT = 3  # a client's data order and dropout
    PARTITION = 4  # assignment of examples to clients


def derive_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 63-bit seed for `(seed, stream, *keys)`; independent streams for distinct keys."""
    entropy = [int(seed), int(stream), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, *keys))


def torch_generator(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stream, *keys))


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    client_id: int
    delta: torch.Tensor  # (D,) float32: local weights - global weights
    num_examples: int  # training windows the client holds (FedAvg weight)
    train_loss: float  # mean loss over the client's local steps
    seconds: float
    bytes_up: int  # size of what the client actually sent

    @property
    def update_norm(self) -> float:
        return float(torch.linalg.vector_norm(self.delta))


@dataclass
class RoundContext:
    """What a hook may need to know about the round in progress."""

    round_idx: int
    seed: int
    num_clients: int  # population size
    cohort: Sequence[int] = field(default_factory=list)


class Strategy(Protocol):
    """Server side of an FL algorithm: fold client updates into the global weights."""

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor: ...

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Mechanism(Protocol):
    """A privacy mechanism: acts on each client's update and on the aggregate."""

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate: ...

    def on_aggregate(self, delta: torch.Tensor, ctx: RoundContext) -> torch.Tensor: ...


class Sampler(Protocol):
    def sample(self, num_clients: int, ctx: RoundContext) -> list[int]: ...


class Backend(Protocol):
    """Runs local training for a cohort of clients, starting from the global weights."""

    def train_cohort(
        self, weights: torch.Tensor, cohort: Sequence[int], ctx: RoundContext
    ) -> list[ClientUpdate]: ...
