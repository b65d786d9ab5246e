"""What the round loop evaluates, audits and saves: the server's view of the model.

Weight-averaging strategies have one global model (`GlobalModel`); the loop's `weights` are its
flat parameters. Logit-exchange distillation has none: each client keeps its own model and
the loop's `weights` are the consensus predictions (`fedrun.strategies.fed_distill.ClientModels`).
Both offer the same few methods, so the loop does not care which it has.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from fedrun.client_eval import ClientEvaluation
from fedrun.core import ClientUpdate, ResponseEval, Stream, derive_seed
from fedrun.data.examples import Examples
from fedrun.evaluation import evaluate
from fedrun.params import flatten_parameters
from fedrun.privacy.audit import CanaryAudit

if TYPE_CHECKING:
    from fedrun.lora import LoRAMethod
    from fedrun.models.hf import HFCausalLM


def initial_model(make_model: Callable[[], nn.Module], device: torch.device,
                  seed: int) -> tuple[nn.Module, torch.Tensor]:
    """The global model (seeded from the INIT stream) and its flat weight vector."""
    torch.manual_seed(derive_seed(seed, Stream.INIT))
    model = make_model().to(device)
    return model, flatten_parameters(model)


class GlobalModel:
    """One model whose flat weights are the loop's `weights`; with LoRA, the adapter is saved too."""

    def __init__(self, make_model: Callable[[], nn.Module], *, device: torch.device, seed: int,
                 audit: CanaryAudit | None = None, evals: Sequence[ResponseEval] = (),
                 client_eval: ClientEvaluation | None = None, lora_method: LoRAMethod | None = None,
                 averages_updates: bool = True):
        """`averages_updates`: the strategy combines clients' updates (not strategy=local or
        centralized), so what averaging LoRA factors loses (lora_agg_error) is measured."""
        self.model, self.flat = initial_model(make_model, device, seed)
        self.lora_method = lora_method
        self.device, self.audit, self.evals, self.client_eval = device, audit, list(evals), client_eval
        self.lora = getattr(self.model, "lora_enabled", False)  # the adapters are saved in peft's layout too
        self.lora_error = self.lora and averages_updates
        self.metric_columns = ((audit.metric_columns if audit else []) + (["lora_agg_error"] if self.lora_error else [])
                               + (client_eval.metric_columns if client_eval else [])
                               + [c for e in self.evals for c in e.metric_columns])

    def initial_weights(self) -> torch.Tensor:
        return self.flat.detach().clone()

    def evaluate(self, weights: torch.Tensor, test: Examples, *, round_idx: int, run_dir: Path) -> dict:
        self.flat.copy_(weights)
        measured = self.audit.measure(self.model, self.device) if self.audit else {}
        per_client = self.client_eval.score(self.model, self.flat, weights, self.device) if self.client_eval else []
        if self.client_eval is not None and self.client_eval.personal is not None:
            metrics = self.client_eval.pooled(per_client)  # each test example scored by its owner's model
        else:
            metrics = evaluate(self.model, test, self.device)
        metrics |= {k: measured[k] for k in self.audit.metric_columns} if self.audit else {}
        if self.client_eval is not None:  # clients_eval.csv, eval_client_ppl_*
            metrics |= self.client_eval.listing(per_client, round_idx=round_idx, run_dir=run_dir)
        for extra in self.evals:  # fedrun/response_eval.py: samples.jsonl, multiple-choice accuracy
            metrics |= extra.evaluate(self.model, self.device, round_idx=round_idx, run_dir=run_dir)
        return metrics

    def round_metrics(self, previous: torch.Tensor, updates: Sequence[ClientUpdate]) -> dict:
        """Averaging LoRA factors A and B separately is not averaging B A: log the relative gap."""
        if not self.lora_error or not updates or not updates[0].delta.is_floating_point():
            return {}
        if self.lora_method is not None:  # its own measure of what its aggregation loses
            error = self.lora_method.aggregation_error(previous, updates)
            return {} if error is None else {"lora_agg_error": error}
        from fedrun.models.hf import lora_aggregation_error

        return {"lora_agg_error": lora_aggregation_error([previous + u.delta for u in updates], self.model)}

    def save(self, rundir, weights: torch.Tensor, *, round_idx: int) -> None:
        self.flat.copy_(weights)
        rundir.save_model(self.model, {"round": str(round_idx)})
        if self.lora:  # peft's layout, loadable with PeftModel.from_pretrained
            cast("HFCausalLM", self.model).save_adapter(Path(rundir.path) / "adapter")
        if self.client_eval is not None and self.client_eval.personal is not None:  # the clients' own weights
            self.client_eval.personal.save_personal(Path(rundir.path), round_idx=round_idx)

    def summary(self) -> dict:
        return {"audit": self.audit.summary(self.model, self.device)} if self.audit else {}
