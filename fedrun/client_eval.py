"""Per-client evaluation (`eval.per_client`): at every evaluation, each client (or a seeded
sample of `eval.clients` of them) scored on its own test split, with the global model or,
for a strategy whose clients keep weights of their own (`strategy=local`), with its own.

Rows go to the run's clients_eval.csv (round, client_id, test_examples, eval_loss, eval_ppl,
eval_acc, model: global | own); metrics.csv gains the mean and the 10th and 90th percentiles
of the clients' perplexities (numpy's linear interpolation), which show how unequally the
model serves its users. The same scores pool into the run's eval metrics when clients keep
their own weights: each test example is scored by its owner's model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from fedrun.core import Stream, numpy_rng
from fedrun.data.examples import FederatedData
from fedrun.evaluation import evaluate_sums, scores
from fedrun.rundir import CsvTable

CLIENTS_EVAL_FILE = "clients_eval.csv"
CLIENTS_EVAL_COLUMNS = ["round", "client_id", "test_examples", "eval_loss", "eval_ppl", "eval_acc", "model"]
CLIENT_PPL_COLUMNS = ["eval_client_ppl_mean", "eval_client_ppl_p10", "eval_client_ppl_p90"]


class PersonalWeights(Protocol):
    """Clients that hold weights of their own (strategy=local; lora.aggregation=fedsa: their B)."""

    def personal_weights(self, client_id: int, weights: torch.Tensor) -> torch.Tensor:
        """The weights client `client_id` holds, given the global `weights`."""

    def save_personal(self, run_dir: Path, *, round_idx: int) -> None: ...


@dataclass
class ClientScore:
    client_id: int
    sums: tuple[float, int, int]  # evaluate_sums: loss sum, correct, predictions
    test_examples: int
    own: bool


def evaluation_order(data: FederatedData, seed: int) -> np.ndarray:
    """The clients with test examples, in a seeded order (the first `eval.clients` are evaluated)."""
    with_test = np.flatnonzero(data.client_sizes("test") > 0)
    return with_test[numpy_rng(seed, Stream.EVAL, 1).permutation(len(with_test))]


class ClientEvaluation:
    """Scores clients on their own test splits; writes clients_eval.csv and the ppl spread."""

    def __init__(self, data: FederatedData, *, seed: int, clients: int | None, listed: bool,
                 personal: PersonalWeights | None):
        self.data, self.personal, self.listed = data, personal, listed
        order = evaluation_order(data, seed)
        self.listed_clients = np.sort(order[:clients] if clients is not None else order).tolist()
        # Own weights make the run's metrics a pool over every client; else only the listed ones are scored.
        self.scored = np.sort(order).tolist() if personal is not None else self.listed_clients
        self.metric_columns = CLIENT_PPL_COLUMNS if listed else []

    def score(self, model: nn.Module, flat: torch.Tensor, weights: torch.Tensor,
              device: torch.device) -> list[ClientScore]:
        """Each scored client under the global weights, or its own where it has them."""
        def load(k: int) -> nn.Module:
            own = self.personal.personal_weights(k, weights) if self.personal is not None else None
            flat.copy_(weights if own is None else own)
            return model

        results = self.score_with(load, device, own=self.personal is not None)
        flat.copy_(weights)
        return results

    def score_with(self, load: Callable[[int], nn.Module], device: torch.device, *, own: bool) -> list[ClientScore]:
        """Each scored client under the model `load(client_id)` makes ready (its own: `own`)."""
        results = []
        for k in self.scored:
            test = self.data.clients[k].test
            results.append(ClientScore(k, evaluate_sums(load(k), test, device), len(test), own))
        return results

    def pooled(self, results: Sequence[ClientScore]) -> dict[str, float]:
        """The run's eval metrics when every client's examples are scored by its own model."""
        total = np.sum([r.sums for r in results], axis=0)
        return scores(float(total[0]), int(total[1]), int(total[2]))

    def listing(self, results: Sequence[ClientScore], *, round_idx: int, run_dir: Path) -> dict[str, float]:
        """clients_eval.csv's rows for the listed clients, and their perplexities' mean and spread."""
        if not self.listed:
            return {}
        wanted = set(self.listed_clients)
        rows = [{"round": round_idx, "client_id": r.client_id, "test_examples": r.test_examples, **scores(*r.sums),
                 "model": "own" if r.own else "global"} for r in results if r.client_id in wanted]
        CsvTable(run_dir / CLIENTS_EVAL_FILE, CLIENTS_EVAL_COLUMNS).append(rows)
        ppl = np.array([row["eval_ppl"] for row in rows], dtype=np.float64)
        return {"eval_client_ppl_mean": float(ppl.mean()), "eval_client_ppl_p10": float(np.percentile(ppl, 10)),
                "eval_client_ppl_p90": float(np.percentile(ppl, 90))}
