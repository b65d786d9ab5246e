"""A workload's data, initial weights and schedule in one file, for contenders without fedrun.

Flower and pfl run in `.venv-bench`, where fedrun's dependencies are not installed. They load
this file instead: every client's training examples, the test set, the model class and its
arguments, the initial weights (fedrun's, drawn from its INIT stream), and for each round the
clients fedrun samples and each client's batch-order and dropout seeds. Both then train the
same clients on the same batches from the same start as fedrun and the floor.

With LoRA (W4's `model=hf`) the file holds the model's spec for `benchmarks.lora` and the
initial adapters under peft's names instead, and the frozen base is saved beside it as a local
transformers checkpoint (`base_dir`), which Flower's FlowerTune client loads for each call.
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import lora
from benchmarks.contender_floor import HF_MODEL, cohort, examples_of, lora_spec, make_model
from fedrun.config import build_data, compose
from fedrun.core import Stream, derive_seed


def model_part(cfg, model_dims: dict, path: Path) -> dict:
    """How the contender builds the model, and its initial (trainable) weights."""
    if cfg.model._target_ == HF_MODEL:
        spec = lora_spec(cfg, model_dims)
        base_dir = path.with_name(path.stem + "_base")
        lora.base_model(spec).save_pretrained(str(base_dir))
        return {"lora": spec, "base_dir": str(base_dir), "init": lora.adapter_state(make_model(cfg, model_dims).model)}
    model = make_model(cfg, model_dims)
    return {"model_target": cfg.model._target_,
            "model_kwargs": {k: v for k, v in cfg.model.items() if k != "_target_"} | dict(model_dims),
            "init": model.state_dict()}


def export(overrides: list[str], path: Path) -> Path:
    cfg = compose(overrides)
    data = build_data(cfg)
    k = cfg.sampler.clients_per_round
    cohorts = [cohort(cfg.seed, r, num_clients=data.num_clients, k=k) for r in range(1, cfg.rounds + 1)]
    torch.save({
        "clients": [examples_of(c.train) for c in data.clients],
        "test": examples_of(data.test_examples()),
        **model_part(cfg, data.model_dims, path),
        "client": dict(cfg.client),
        "rounds": cfg.rounds,
        "cohorts": cohorts,
        "order_seeds": [[derive_seed(cfg.seed, Stream.CLIENT, r, c) for c in ids]
                        for r, ids in enumerate(cohorts, start=1)],
        "dropout_seeds": [[derive_seed(cfg.seed, Stream.CLIENT, r, c, 1) for c in ids]
                          for r, ids in enumerate(cohorts, start=1)],
    }, path)
    return path
