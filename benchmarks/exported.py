"""Reading `benchmarks.export`'s file in `.venv-bench`: the model and a client's batches."""
from __future__ import annotations

import importlib

import torch
from torch import nn

from benchmarks import bare


def load(path: str) -> dict:
    """The exported workload; tensors memory-mapped, so worker processes share the pages."""
    return torch.load(path, mmap=True, weights_only=True)


def make_model(work: dict) -> nn.Module:
    """The workload's model class (fedrun's, torch-only modules) with the initial weights."""
    module, _, name = work["model_target"].rpartition(".")
    model = getattr(importlib.import_module(module), name)(**work["model_kwargs"])
    model.load_state_dict(work["init"])
    return model


def client_batches(work: dict, client: int, order_seed: int) -> list[torch.Tensor]:
    """The client's mini-batch indices, drawn exactly as fedrun draws them."""
    n = bare.size(work["clients"][client])
    c = work["client"]
    steps = bare.num_steps(n, batch_size=c["batch_size"], local_steps=c["local_steps"],
                           local_epochs=c["local_epochs"])
    generator = torch.Generator().manual_seed(order_seed)
    return list(bare.epoch_batches(n, c["batch_size"], steps, generator))
