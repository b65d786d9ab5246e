"""The `client` config group: how each client trains locally. Its fields are the group's schema."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from fedrun.components import OneOf, Range

OPTIMIZERS = ("sgd", "adam")
AtLeastOne = Annotated[int, Range(ge=1)]


@dataclass(frozen=True)
class ClientConfig:
    optimizer: Annotated[str, OneOf(*OPTIMIZERS)]
    lr: Annotated[float, Range(gt=0)]
    momentum: Annotated[float, Range(ge=0, lt=1)]
    weight_decay: Annotated[float, Range(ge=0)]
    batch_size: AtLeastOne
    local_epochs: AtLeastOne | None  # exactly one of local_epochs and local_steps
    local_steps: AtLeastOne | None
    local_steps_min: AtLeastOne | None = None  # stragglers: each client's steps drawn from [min, max]
    local_steps_max: AtLeastOne | None = None
    # strategy=fed_distill only: each client's architecture by fraction (conf/client/hetero.yaml);
    # local training itself never reads it.
    models: list[Any] | None = None
    # model=hf with model.lora.aggregation flora, flexlora or hetlora: each client's LoRA rank by
    # fraction, [{rank: 4, fraction: 0.5}, ...] (fedrun/lora/ranks.py); null: every client model.lora.r.
    lora_ranks: list[Any] | None = None

    def num_steps(self, num_examples: int, generator: torch.Generator) -> int:
        if self.local_steps_min is not None:
            assert self.local_steps_max is not None  # checks.py: both or neither
            return int(torch.randint(self.local_steps_min, self.local_steps_max + 1, (), generator=generator))
        if self.local_steps is not None:
            return self.local_steps
        assert self.local_epochs is not None  # checks.py: exactly one of the two
        return self.local_epochs * math.ceil(num_examples / self.batch_size)
