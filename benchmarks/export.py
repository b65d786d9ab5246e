"""A workload's data, initial weights and schedule in one file, for contenders without fedrun.

Flower and pfl run in `.venv-bench`, where fedrun's dependencies are not installed. They load
this file instead: every client's training examples, the test set, the model class and its
arguments, the initial weights (fedrun's, drawn from its INIT stream), and for each round the
clients fedrun samples and each client's batch-order seed. Both then train the same clients
on the same batches from the same start as fedrun and the floor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.contender_floor import cohort, examples_of
from fedrun.config import build_data, compose
from fedrun.core import Stream, derive_seed


def export(overrides: list[str], path: Path) -> Path:
    cfg = compose(overrides)
    data = build_data(cfg)
    torch.manual_seed(derive_seed(cfg.seed, Stream.INIT))
    model_kwargs = {k: v for k, v in cfg.model.items() if k != "_target_"} | dict(data.model_dims)
    from hydra.utils import get_class

    model = get_class(cfg.model._target_)(**model_kwargs)
    k = cfg.sampler.clients_per_round
    cohorts = [cohort(cfg.seed, r, num_clients=data.num_clients, k=k) for r in range(1, cfg.rounds + 1)]
    torch.save({
        "clients": [examples_of(c.train) for c in data.clients],
        "test": examples_of(data.test_examples()),
        "model_target": cfg.model._target_,
        "model_kwargs": model_kwargs,
        "init": model.state_dict(),
        "client": dict(cfg.client),
        "rounds": cfg.rounds,
        "cohorts": cohorts,
        "order_seeds": [[derive_seed(cfg.seed, Stream.CLIENT, r, c) for c in ids]
                        for r, ids in enumerate(cohorts, start=1)],
    }, path)
    return path
