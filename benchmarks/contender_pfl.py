"""pfl-research (Apple, pfl 0.6) with its PyTorch backend on an exported workload.

pfl's simulation as its tutorials set it up: a FederatedDataset whose sampler yields user ids
and whose `make_dataset_fn` builds each user's Dataset, a PyTorchModel (local SGD, central
SGD with learning rate 1), FederatedAveraging, and a SimulatedBackend weighting each user by
its data points. The sampler yields fedrun's cohort of each round, and each user's Dataset
yields fedrun's mini-batches, so the work is the same as the floor's. Runs in `.venv-bench`:
`python -m benchmarks.contender_pfl SPEC RESULT`.
"""
from __future__ import annotations

import json
import os
import sys
from itertools import chain

import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.hyperparam import NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn

from benchmarks import bare, exported
from benchmarks.measure import RoundClock


class WithLoss(nn.Module):
    """The `loss` and `metrics` methods pfl asks of a PyTorch module."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        self.eval() if eval else self.train()
        return bare.loss_of(self.inner, x, y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict:
        self.eval() if eval else self.train()
        return {"loss": Weighted(float(bare.loss_of(self.inner, x, y, reduction="sum")), y.numel())}


class ScheduledBatches(Dataset):
    """A user's Dataset whose mini-batches are fedrun's (pfl's own iter slices in order)."""

    def __init__(self, examples: dict[str, torch.Tensor], batches: list[torch.Tensor], user_id: str):
        super().__init__(raw_data=bare.inputs_targets(examples), user_id=user_id)
        self.batches = batches

    def iter(self, batch_size):  # noqa: A003  (pfl's name)
        x, y = self.raw_data
        for idx in self.batches:
            yield [x[idx], y[idx]]


class RoundTimer(TrainingProcessCallback):
    def __init__(self, clock: RoundClock, rounds: int):
        self.clock, self.rounds = clock, rounds

    def on_train_begin(self, *, model) -> Metrics:
        self.clock.start_round()
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.clock.end_round()
        if central_iteration + 1 < self.rounds:
            self.clock.start_round()
        return False, Metrics()


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    clock = RoundClock()
    w = exported.load(os.environ["BENCH_EXPORT"])
    schedule = list(chain.from_iterable(zip(ids, seeds) for ids, seeds in zip(w["cohorts"], w["order_seeds"])))
    position = iter(range(len(schedule)))

    def make_dataset(i: int) -> Dataset:
        client, seed = schedule[i]
        return ScheduledBatches(w["clients"][client], exported.client_batches(w, client, seed), str(client))

    data = FederatedDataset(make_dataset, lambda: next(position))
    module = WithLoss(exported.make_model(w))
    model = PyTorchModel(module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0))
    c, rounds = w["client"], w["rounds"]
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                                           train_cohort_size=len(w["cohorts"][0]), val_cohort_size=0),
        backend=SimulatedBackend(training_data=data, val_data=data, postprocessors=[WeightByDatapoints()]),
        model=model,
        model_train_params=NNTrainHyperParams(local_num_epochs=1, local_learning_rate=c["lr"],
                                              local_batch_size=c["batch_size"]),
        callbacks=[RoundTimer(clock, rounds)],
    )
    clock.report(result_path, eval_loss=bare.eval_loss(module.inner, w["test"]), warmup=spec["warmup"])


if __name__ == "__main__":
    main(*sys.argv[1:])
