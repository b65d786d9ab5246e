"""FedDF (Lin et al. 2020, "Ensemble Distillation for Robust Model Fusion in Federated Learning").

After averaging, the server refines the global model by distilling the ensemble of the round's
client models into it, on unlabelled public text that is never any client's data: the target is
the mean of the clients' softened next-token distributions, softmax(logits / T); the student
minimises T^2 KL(target || softmax(student / T)) with Adam for `distill_steps` steps, keeping
the weights that score best on a held-out part of the public corpus (early stopping).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from fedrun.components import Range
from fedrun.core import ClientUpdate, Stream, torch_generator
from fedrun.data.examples import FederatedData, concat
from fedrun.params import flatten_parameters
from fedrun.strategies.server import ServerStrategy


def ensemble_target(teacher: nn.Module, teacher_flat: torch.Tensor, client_weights: Sequence[torch.Tensor],
                    x: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over clients of softmax(logits / T): (B, T, V). One reused model, weights swapped in."""
    total: torch.Tensor | None = None
    with torch.no_grad():
        for w in client_weights:
            teacher_flat.copy_(w)
            probs = F.softmax(teacher(x) / temperature, dim=-1)
            total = probs if total is None else total + probs
    assert total is not None, "an ensemble needs at least one client"
    return total / len(client_weights)


def distillation_loss(student_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    kl = (target * (target.clamp_min(1e-12).log() - log_student)).sum(-1).mean()
    return kl * temperature**2


class FedDF(ServerStrategy):
    """FedAvg, then ensemble distillation of the round's client models into the average."""

    needs_individual_updates = True  # the teachers are the clients' own models
    config_nodes = {"public": "data"}  # the public corpus, a data source the run builds

    def __init__(self, *, temperature: Annotated[float, Range(gt=0)], distill_steps: Annotated[int, Range(ge=0)],
                 distill_lr: Annotated[float, Range(gt=0)], distill_batch: Annotated[int, Range(ge=1)],
                 eval_every: Annotated[int, Range(ge=1)], public: FederatedData, make_model: Callable[[], nn.Module],
                 seed: int, device: torch.device):
        super().__init__()
        self.student, self.teacher = make_model().to(device), make_model().to(device)
        self.student_flat, self.teacher_flat = flatten_parameters(self.student), flatten_parameters(self.teacher)
        self.public_fingerprint = public.fingerprint
        self.train_set = concat([c.train for c in public.clients])
        self.held_out = concat([c.test for c in public.clients])
        self.temperature, self.steps, self.lr, self.batch = temperature, distill_steps, distill_lr, distill_batch
        self.eval_every, self.seed, self.device = eval_every, seed, device
        self._clients: list[torch.Tensor] = []
        self._round = 0

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        self._clients = [u.delta for u in updates]  # deltas; the teachers are global + delta
        return super().aggregate(updates)

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        self._round += 1
        fused = super().apply(weights, delta)
        teachers, self._clients = [weights + d for d in self._clients], []
        return fused if self.steps == 0 or not teachers else self.distill(fused, teachers)

    def distill(self, start: torch.Tensor, teachers: list[torch.Tensor]) -> torch.Tensor:
        self.student_flat.copy_(start)
        optimizer = torch.optim.Adam([p for p in self.student.parameters() if p.requires_grad], lr=self.lr)
        g = torch_generator(self.seed, Stream.SAMPLE, self._round, 1 << 20)  # the server's own stream
        held_x, _ = self.held_out[: self.batch * 4].inputs_targets(self.device)
        held_target = ensemble_target(self.teacher, self.teacher_flat, teachers, held_x, self.temperature)
        best, best_loss = start.clone(), self._held_out_loss(held_x, held_target)
        self.student.train()
        for step in range(1, self.steps + 1):
            idx = torch.randint(len(self.train_set), (self.batch,), generator=g)
            x, _ = self.train_set[idx].inputs_targets(self.device)
            target = ensemble_target(self.teacher, self.teacher_flat, teachers, x, self.temperature)
            loss = distillation_loss(self.student(x), target, self.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step % self.eval_every == 0 or step == self.steps:
                held = self._held_out_loss(held_x, held_target)
                if held < best_loss:
                    best, best_loss = self.student_flat.detach().clone(), held
        return best

    def state_dict(self) -> dict:
        return super().state_dict() | {"round": self._round}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._round = state.get("round", 0)

    def _held_out_loss(self, x: torch.Tensor, target: torch.Tensor) -> float:
        with torch.no_grad():
            return float(distillation_loss(self.student(x), target, self.temperature))
