"""Every client's own model, for strategies where clients never share weights (`fed_distill`).

Clients get architectures by fraction (`client.models`; one architecture when it is null):
a seeded permutation of the clients is cut into consecutive blocks, sizes by largest
remainder. A client starts from its architecture's initial weights (the first architecture's
are the global model's of a weight-averaging run with the same seed) and keeps what it
learns: the weights it ends a round with come back in its update's extras and are stored
here on the client side, before any privacy hook sees the update; they are never sent.

As the loop's server model it evaluates, on the shared test set, up to `eval_clients`
clients per architecture (a fixed seeded choice among those that have trained; the initial
model before any has) and reports each architecture's mean loss, its perplexity and accuracy.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from fedrun.client_eval import ClientEvaluation
from fedrun.core import ClientUpdate, FedrunError, RoundContext, Stream, derive_seed, numpy_rng
from fedrun.data.examples import Examples
from fedrun.evaluation import evaluate, perplexity
from fedrun.params import flatten_parameters
from fedrun.rundir import atomic_write


@dataclass
class ModelSpec:
    name: str  # used in metric names: eval_ppl_<name>
    make_model: Callable[[], nn.Module]
    fraction: float


def assign_architectures(fractions: Sequence[float], *, num_clients: int, seed: int,
                         key: int | None = None) -> np.ndarray:
    """(num_clients,) architecture (or LoRA rank: `key` 1) index of each client."""
    quotas = np.asarray(fractions, dtype=np.float64) * num_clients
    counts = np.floor(quotas).astype(np.int64)
    leftover = num_clients - counts.sum()
    counts[np.argsort(-(quotas - counts), kind="stable")[:leftover]] += 1  # largest remainder
    order = (numpy_rng(seed, Stream.MODELS) if key is None else numpy_rng(seed, Stream.MODELS, key)).permutation(
        num_clients)
    arch = np.empty(num_clients, dtype=np.int64)
    arch[order] = np.repeat(np.arange(len(counts)), counts)
    return arch


class ClientModels:
    """Client-side store of every client's weights, and their evaluation by architecture."""

    def __init__(self, specs: Sequence[ModelSpec], *, num_clients: int, seed: int, device: torch.device,
                 eval_clients: int):
        self.specs, self.device = list(specs), device
        self.make_models = [s.make_model for s in self.specs]
        self.arch_of = assign_architectures([s.fraction for s in self.specs], num_clients=num_clients, seed=seed)
        self.models, self.flats, self.initial = [], [], []
        for k, spec in enumerate(self.specs):
            torch.manual_seed(derive_seed(seed, Stream.INIT) if k == 0 else derive_seed(seed, Stream.INIT, k))
            model = spec.make_model().to(device)
            self.models.append(model)
            self.flats.append(flatten_parameters(model))
            self.initial.append(self.flats[-1].detach().clone())
        self.vocab_size = self._vocab_size()
        rng = numpy_rng(seed, Stream.MODELS, 1)
        self.eval_order = [rng.permutation(np.flatnonzero(self.arch_of == k)) for k in range(len(self.specs))]
        self.eval_clients = eval_clients
        self.weights: dict[int, torch.Tensor] = {}
        self.metric_columns = [] if len(self.specs) == 1 else [
            f"eval_{m}_{s.name}" for s in self.specs for m in ("loss", "ppl", "acc")]
        self.client_eval: ClientEvaluation | None = None  # eval.per_client: each client's own model on its own test

    def evaluate_per_client(self, client_eval: ClientEvaluation) -> None:
        """eval.per_client: list every client's own model on its own test split."""
        self.client_eval = client_eval
        self.metric_columns = self.metric_columns + client_eval.metric_columns

    def _load(self, client_id: int) -> nn.Module:
        arch = self.arch_of[client_id]
        self.flats[arch].copy_(self.weights_of(client_id))
        return self.models[arch]

    def _vocab_size(self) -> int:
        """The width of the models' output: they must agree to exchange distributions."""
        x = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            sizes = sorted({m(x).shape[-1] for m in self.models})
        if len(sizes) != 1:
            raise FedrunError(f"client.models: the architectures disagree on the vocabulary size ({sizes}); "
                              "logit exchange needs one output space")
        return sizes[0]

    def weights_of(self, client_id: int) -> torch.Tensor:
        stored = self.weights.get(client_id)
        return self.initial[self.arch_of[client_id]] if stored is None else stored

    # ---- client side: keep what each client learnt ---------------------------------------------

    def on_client(self, update: ClientUpdate, ctx: RoundContext) -> ClientUpdate:
        self.weights[update.client_id] = update.extras.pop("weights")
        return update

    # ---- server model: evaluation and the final save ------------------------------------------------

    def initial_weights(self) -> torch.Tensor:
        return torch.zeros(0, device=self.device)  # no consensus before the first exchange

    def evaluate(self, weights: torch.Tensor, test: Examples, *, round_idx: int, run_dir: Path) -> dict:
        per_arch: dict[str, float] = {}
        losses: list[float] = []
        accs: list[float] = []
        for k, spec in enumerate(self.specs):
            trained = [c for c in self.eval_order[k] if int(c) in self.weights][: self.eval_clients]
            states = [self.weights[int(c)] for c in trained] or [self.initial[k]]
            results = []
            for state in states:
                self.flats[k].copy_(state)
                results.append(evaluate(self.models[k], test, self.device))
            loss = sum(r["eval_loss"] for r in results) / len(results)
            acc = sum(r["eval_acc"] for r in results) / len(results)
            per_arch |= {f"eval_loss_{spec.name}": loss, f"eval_ppl_{spec.name}": perplexity(loss),
                         f"eval_acc_{spec.name}": acc}
            losses += [r["eval_loss"] for r in results]
            accs += [r["eval_acc"] for r in results]
        loss = sum(losses) / len(losses)
        overall = {"eval_loss": loss, "eval_ppl": perplexity(loss), "eval_acc": sum(accs) / len(accs)}
        if self.client_eval is not None:
            scores = self.client_eval.score_with(self._load, self.device, own=True)
            overall |= self.client_eval.listing(scores, round_idx=round_idx, run_dir=run_dir)
        return overall | (per_arch if len(self.specs) > 1 else {})

    def round_metrics(self, previous: torch.Tensor, updates: Sequence[ClientUpdate]) -> dict:
        return {}

    def save(self, rundir, weights: torch.Tensor, *, round_idx: int) -> None:
        """client_models.safetensors: each trained client's flat weights, and who holds which architecture."""
        tensors = {f"client_{c}": w.detach().cpu().contiguous() for c, w in sorted(self.weights.items())}
        tensors |= {f"initial_{s.name}": w.cpu() for s, w in zip(self.specs, self.initial)}
        meta = {"round": str(round_idx), "architectures": json.dumps(
            {s.name: np.flatnonzero(self.arch_of == k).tolist() for k, s in enumerate(self.specs)})}
        atomic_write(rundir.path / "client_models.safetensors", lambda p: save_file(tensors, str(p), metadata=meta))

    def summary(self) -> dict:
        return {"architectures": {s.name: {"clients": int((self.arch_of == k).sum()),
                                           "params": int(self.initial[k].numel())}
                                  for k, s in enumerate(self.specs)}}

    def state_dict(self) -> dict:
        return {"weights": {int(c): w.detach().cpu() for c, w in self.weights.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.weights = {int(c): w.to(self.device) for c, w in state["weights"].items()}


