"""Small records and protocols shared by every part of fedrun, and the seeding helpers.

Updates are flat float32 vectors over the trainable parameters (`delta = local - global`);
aggregation, clipping, noise and compression are then a few vector operations.
Randomness is derived, never carried: every stream is seeded from
`(seed, purpose, round, client)`, so results do not depend on execution order or on the
backend, and a resumed run needs no RNG state beyond the seed.
"""
from __future__ import annotations

import enum
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

if TYPE_CHECKING:
    from pathlib import Path

    from fedrun.privacy.accounting import DPEvent


class FedrunError(Exception):
    """An error the user can fix: the CLI prints it as one line (no traceback) and exits 2."""


class Stream(enum.IntEnum):
    """The purpose of a random stream; part of every derived seed."""

    INIT = 1  # initial global model
    SAMPLE = 2  # which clients take part in a round
    CLIENT = 3  # a client's data order and dropout
    PARTITION = 4  # assignment of examples to clients
    DROPOUT = 5  # which sampled clients fail before reporting
    ATTACK = 6  # which clients are malicious, and their random updates
    NOISE = 7  # the server's DP noise
    SECAGG = 8  # secure aggregation's keys and masks
    PUBLIC = 9  # which public windows the server asks for (distillation)
    MODELS = 10  # which clients hold which architecture
    EVAL = 11  # which held-out prompts eval.samples answers
    AUDIT = 12  # audit=epsilon's canary and held-out directions


def derive_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 63-bit seed for `(seed, stream, *keys)`; independent streams for distinct keys."""
    entropy = [int(seed), int(stream), *(int(k) for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def numpy_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, *keys))


def torch_generator(seed: int, stream: Stream, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, stream, *keys))


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the global generator that `device`'s dropout draws from. `torch.manual_seed` would
    seed every accelerator's too, ~2 ms a call: a fifth of a light round of 100 clients."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def make_deterministic(device: torch.device) -> None:
    """On CUDA, ask torch for deterministic kernels, so that the same seed and a resumed run
    give the same metrics there as on the CPU (index_add_, scatter and some backward passes
    otherwise add in whatever order their atomics land). cuBLAS needs its workspace fixed
    before its first call for that; an op with no deterministic kernel warns instead of failing."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


@dataclass
class OwnCoordinates:
    """Weights a client keeps for itself: `values` at `index` of the flat vector (all of it when
    `index` is None); the other coordinates come from the global weights."""

    values: torch.Tensor
    index: torch.Tensor | None = None  # int64 positions

    def start(self, weights: torch.Tensor) -> torch.Tensor:
        values = self.values.to(weights)
        return values if self.index is None else weights.index_copy(0, self.index.to(weights.device), values)


@dataclass
class ClientJob:
    """What the server sends one client besides the global weights, and what the client keeps."""

    client_id: int
    payload: dict[str, torch.Tensor] = field(default_factory=dict)  # sent down, counted in bytes_down
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # what the client keeps: never sent
    # Coordinates of the weights the client holds itself and starts from instead of the global
    # ones (strategy=local: all of them; lora.aggregation=fedsa: its B factors). None: none.
    own: OwnCoordinates | None = None
    coords_down: int | None = None  # how many coordinates of the global weights go down to it; None: all

    def start(self, weights: torch.Tensor) -> torch.Tensor:
        """The weights the client starts training from, given the global `weights`."""
        return weights if self.own is None else self.own.start(weights)

    @property
    def extra_bytes(self) -> int:
        """Bytes sent down besides the weights: the payload (the state stays on the client)."""
        return sum(t.numel() * t.element_size() for t in self.payload.values())


# Adds a local rule's term, in place, to the gradients (a, D) of the first a rows (a, D) of a stack.
GradientTerm = Callable[[torch.Tensor, torch.Tensor], None]


class LocalRule(Protocol):
    """A strategy's client side (`strategy.local_rule`; None when its clients just train): a term
    it adds to every local gradient and the vectors its clients send besides the update. The
    trainer calls it for one client, the vectorized backend for a stack of clients; it reads each
    client's inputs from its job (`payload`, `state`). It lives in the strategy's own module."""

    def gradient_term(self, jobs: Sequence[ClientJob], weights: torch.Tensor) -> GradientTerm | None:
        """The term for the stacked rows of these clients (row k: jobs[k]), who all start from
        `weights` (D,); prepared once before their local steps. None: nothing to add."""
        ...

    def client_extras(self, job: ClientJob, delta: torch.Tensor, *, steps: int, lr: float) -> dict[str, torch.Tensor]:
        """What the client sends besides `delta`, after `steps` local steps of rate `lr`."""
        ...


@dataclass
class ClientUpdate:
    """What one client sends back after local training."""

    client_id: int
    delta: torch.Tensor  # (D,) float32: local weights - global weights
    num_examples: int  # training examples the client holds (FedAvg weight)
    train_loss: float  # mean loss over the client's local steps
    seconds: float
    bytes_up: int  # size of what the client actually sent
    num_steps: int = 0  # local optimizer steps taken
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. SCAFFOLD's control delta
    malicious: bool = False  # set by an attack: the update is not what honest training gave
    canary: bool = False  # audit=epsilon's canary client: a planted direction, counted in no client metric

    @property
    def update_norm(self) -> float | None:
        """None for a masked (secure aggregation) update: nobody but the client knows it."""
        if not self.delta.is_floating_point():
            return None
        return float(torch.linalg.vector_norm(self.delta))


@dataclass
class RoundContext:
    """What a hook may need to know about the round in progress."""

    round_idx: int
    seed: int
    num_clients: int  # population size
    cohort: Sequence[int] = field(default_factory=list)


class ClientHook(Protocol):
    """Acts on a client's update on the client side, before it is sent (attack, privacy)."""

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate: ...


class StatefulHook(ClientHook, Protocol):
    """A client hook whose state a checkpoint keeps (compression: error feedback's leftovers)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Strategy(Protocol):
    """An FL algorithm: what each client is sent, and how updates fold into the global weights."""

    def begin_round(self, ctx: RoundContext) -> None:
        """Called once the cohort is sampled, before any client_job."""
        ...

    def client_job(self, client_id: int) -> ClientJob: ...

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor: ...

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Mechanism(ClientHook, Protocol):
    """A privacy mechanism: a client hook (`on_client`: clip, mask, or account the client's own
    DP-SGD steps) and a server hook (`aggregate`: noise, unmask), each adding to the round's
    metrics (`round_metrics`); its accounting is a ledger of DPEvents (fedrun.privacy.accounting)."""

    @property
    def metric_columns(self) -> list[str]:
        """Extra metrics.csv columns it fills each round."""
        ...

    def allows_round(self, ctx: RoundContext) -> bool:
        """False to stop before the round (its budget would be exceeded)."""
        ...

    def begin_round(self, ctx: RoundContext) -> None:
        """Called once the cohort is sampled, before any client trains."""
        ...

    def aggregate(self, updates: Sequence[ClientUpdate], ctx: RoundContext,
                  strategy: Strategy) -> torch.Tensor | None:
        """The round's aggregate delta, or None to keep the global model this round."""
        ...

    def round_metrics(self, *, tight: bool) -> dict[str, float | None]: ...

    def round_events(self, round_idx: int) -> Sequence[DPEvent]:
        """The DPEvents the server recorded in round `round_idx` (privacy_ledger.csv's rows)."""
        ...

    def summary(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Sampler(Protocol):
    dropout: float  # probability that a sampled client fails before reporting

    def sample(self, num_examples: np.ndarray, ctx: RoundContext) -> list[int]:
        """The round's cohort, given each client's number of training examples."""
        ...


class ServerModel(Protocol):
    """What the loop evaluates and saves; `weights` is the state the server sends every client
    (the global model's flat weights, or logit exchange's consensus predictions)."""

    metric_columns: list[str]  # extra metrics.csv columns its evaluation fills

    def initial_weights(self) -> torch.Tensor: ...

    def evaluate(self, weights: torch.Tensor, test, *, round_idx: int, run_dir: Path) -> dict:
        """Metrics of `weights` on `test` after round `round_idx`; may write files into `run_dir`."""

    def round_metrics(self, previous: torch.Tensor, updates: Sequence[ClientUpdate]) -> dict: ...

    def save(self, rundir, weights: torch.Tensor, *, round_idx: int) -> None: ...

    def summary(self) -> dict: ...


class ResponseEval(Protocol):
    """An evaluation of the global model besides the test loss (fedrun/response_eval.py)."""

    metric_columns: list[str]  # the metrics.csv columns it fills

    def evaluate(self, model: torch.nn.Module, device: torch.device, *, round_idx: int, run_dir: Path) -> dict: ...


class Backend(Protocol):
    """Runs local training for a cohort of clients, starting from the global weights."""

    def train_cohort(
        self, weights: torch.Tensor, jobs: Sequence[ClientJob], ctx: RoundContext
    ) -> list[ClientUpdate]: ...

    def close(self) -> None:
        """Release workers (processes, Ray actors); called when a run ends, however it ends."""
        ...
