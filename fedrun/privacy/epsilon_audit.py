"""`audit=epsilon`: an empirical epsilon from the training run itself, beside the accounted one.

Andrew et al., "One-shot Empirical Privacy Estimation for Federated Learning" (ICLR 2024):
- `canary_clients` extra users join the population (ids N..N+C-1 after the N real clients), so
  the sampler, the accountant's N and q and secure aggregation's cohort treat them as users.
  Each has a fixed random unit direction in the update space (the flat trainable vector: the
  LoRA adapters when LoRA is on); when sampled it trains nothing and sends its direction
  scaled to the clip norm (or `canary_norm`), through the privacy mechanism like any update.
- As many held-out directions are drawn and never inserted.
- Statistics: the cosine of each direction with the model's total change (final minus initial:
  what an adversary who sees only the final model has), and the largest cosine with any one
  round's change (the "all iterates" adversary the accountant's bound is about).
- Estimate: the epsilon at the run's delta that separates Gaussian fits of the held-out and the
  inserted cosines (fedrun/privacy/empirical.py). It is a point estimate; beside it the
  summary gives the membership-test lower bound at 95% confidence (Jeffreys intervals).
Canary clients count in no utility metric, byte count or client table; canaries never
sampled are left out of the inserted set (recorded as insertions 0).

With `num_canaries` > 0 the Secret Sharer's text canaries are planted too (audit=canaries'
keys, fedrun/privacy/audit.py), so one run gives both measures.
"""
from __future__ import annotations

import logging
import math
from typing import Annotated, Any

import numpy as np
import torch
from torch import nn

from fedrun.components import Range
from fedrun.core import ClientHook, ClientUpdate, RoundContext, Stream, torch_generator
from fedrun.privacy.audit import AtLeastOne, CanaryAudit
from fedrun.privacy.empirical import (
    CONFIDENCE,
    bootstrap_interval,
    epsilon_lower_bound,
    estimate,
    gaussian_fit,
    noise_floor,
)

log = logging.getLogger(__name__)
FEW_INSERTED = 100  # below this many inserted canaries, Gaussian fits of their spread are loose: say so
EPSILON_COLUMNS = ["epsilon_empirical", "epsilon_empirical_final"]
DIRECTION_COLUMNS = ["direction", "kind", "client_id", "insertions", "cosine_final", "cosine_max_round"]
AUDIT_EPSILON_FILE = "audit_epsilon.csv"


class EpsilonAudit(CanaryAudit):
    """Canary clients with random directions; the epsilon their cosines with the model imply."""

    inserts_clients = True  # the run's population grows by `canary_clients`

    def __init__(self, *, canary_clients: AtLeastOne, canary_norm: Annotated[float, Range(gt=0)] | None,
                 num_canaries: Annotated[int, Range(ge=0)], seed: int, **keys: Any):
        super().__init__(num_canaries=num_canaries, seed=seed, **keys)
        self.canary_clients, self.canary_norm = canary_clients, canary_norm
        self.plants_secrets = num_canaries > 0
        self.real_clients = 0
        self.mean_examples = 1  # a canary's examples: the mean real client's (with_canary_sizes)
        self.directions: torch.Tensor | None = None  # (2C, D) unit rows: C canaries, then C held out
        self.initial: torch.Tensor | None = None
        self.insertions = np.zeros(canary_clients, dtype=np.int64)
        self.max_cosines = np.full(2 * canary_clients, -np.inf)
        self.last: dict[str, Any] = {}

    def measure(self, model: nn.Module, device: torch.device) -> dict:
        return super().measure(model, device) if self.plants_secrets else {}

    # ---- the population ----------------------------------------------------------------------

    def population(self, real_clients: int) -> int:
        self.real_clients = real_clients
        return real_clients + self.canary_clients

    def with_canary_sizes(self, sizes: np.ndarray) -> np.ndarray:
        """Every client's examples, canaries last: each as many as the mean real client (a
        weighted sampler or FedAvg's example weights then treat them as an average user)."""
        self.mean_examples = max(int(round(float(sizes.mean()))), 1) if len(sizes) else 1
        return np.concatenate([sizes, np.full(self.canary_clients, self.mean_examples, dtype=sizes.dtype)])

    def is_canary(self, client_id: int) -> bool:
        return client_id >= self.real_clients

    def start(self, initial: torch.Tensor) -> None:
        """The directions, in the space of the model's flat trainable vector `initial`."""
        self.initial = initial.detach().clone()
        g = torch_generator(self.seed, Stream.AUDIT)
        rows = torch.randn(2 * self.canary_clients, initial.numel(), generator=g)
        self.directions = (rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)).to(initial.device)

    # ---- each round --------------------------------------------------------------------------

    def updates(self, client_ids: list[int], ctx: RoundContext, *, clip_norm: float | None,
                hooks: list[ClientHook]) -> list[ClientUpdate]:
        """What the reporting canary clients send: their directions at the clip norm, then the
        privacy mechanism's client side (clipping, secure aggregation's mask) like any update."""
        assert self.directions is not None, "start() gives the directions"
        norm = self.canary_norm if self.canary_norm is not None else clip_norm
        assert norm is not None, "checks refuse audit=epsilon without a clip norm or audit.canary_norm"
        sent = []
        for cid in client_ids:
            index = cid - self.real_clients
            self.insertions[index] += 1
            direction = self.directions[index]
            update = ClientUpdate(client_id=cid, delta=direction * norm, num_examples=self.mean_examples,
                                  train_loss=math.nan, seconds=0.0,
                                  bytes_up=direction.numel() * direction.element_size(), canary=True)
            for hook in hooks:
                update = hook.on_client(update, ctx)
            sent.append(update)
        return sent

    def observe(self, change: torch.Tensor) -> None:
        """One round's change of the model: every direction's largest cosine so far."""
        cosines = self._cosines(change)
        if cosines is not None:
            self.max_cosines = np.maximum(self.max_cosines, cosines)

    def _cosines(self, change: torch.Tensor) -> np.ndarray | None:
        assert self.directions is not None
        norm = float(torch.linalg.vector_norm(change.double()))
        if norm == 0 or not math.isfinite(norm):
            return None  # a round that kept the model says nothing about any direction
        # A few rows at a time: float64 copies of every direction would double their memory.
        change = change.double()
        return np.concatenate([(rows.double() @ change / norm).cpu().numpy() for rows in self.directions.split(16)])

    # ---- the estimate ------------------------------------------------------------------------

    def estimate(self, weights: torch.Tensor, *, delta: float) -> dict[str, float]:
        """epsilon_empirical (all rounds' changes) and epsilon_empirical_final (the total change)."""
        assert self.initial is not None
        final = self._cosines(weights - self.initial)
        c = self.canary_clients
        seen = self.insertions > 0
        final = final if final is not None else np.zeros(2 * c)
        rounds = np.where(np.isfinite(self.max_cosines), self.max_cosines, 0.0)
        self.last = {"final": final, "rounds": rounds, "delta": delta}
        return {"epsilon_empirical": estimate(rounds[:c][seen], rounds[c:], delta),
                "epsilon_empirical_final": estimate(final[:c][seen], final[c:], delta)}

    def rows(self) -> list[dict[str, Any]]:
        """audit_epsilon.csv: every direction's cosines as of the last estimate."""
        c, last = self.canary_clients, self.last
        return [{"direction": i, "kind": "canary" if i < c else "held_out",
                 "client_id": self.real_clients + i if i < c else None,
                 "insertions": int(self.insertions[i]) if i < c else 0,
                 "cosine_final": float(last["final"][i]), "cosine_max_round": float(last["rounds"][i])}
                for i in range(2 * c)] if last else []

    def summary(self, model: nn.Module, device: torch.device) -> dict:
        out = super().summary(model, device) if self.plants_secrets else {}
        return out | {"epsilon": self.epsilon_summary()}

    def epsilon_summary(self) -> dict[str, Any]:
        c, last = self.canary_clients, self.last
        out: dict[str, Any] = {
            "canary_clients": c, "real_clients": self.real_clients, "held_out_directions": c,
            "canaries_inserted": int((self.insertions > 0).sum()), "insertions": int(self.insertions.sum()),
            "dimension": 0 if self.initial is None else self.initial.numel(),
            "canary_norm": self.canary_norm if self.canary_norm is not None else "clip norm",
            "estimate": "point estimate: the epsilon separating Gaussian fits of the held-out and inserted cosines "
                        "(Andrew et al. 2024); bootstrap_90: its 5%..95% range over resampled cosines; "
                        "noise_floor: its median when nothing leaks, at these sample sizes; "
                        f"the lower bounds hold with confidence {CONFIDENCE}"}
        if not last:
            return out
        seen = self.insertions > 0
        out["null_std"] = out["dimension"] ** -0.5  # a random direction's cosine with a fixed vector: ~N(0, 1/D)
        for name, cosines in (("final", last["final"]), ("all_rounds", last["rounds"])):
            inserted, held_out = cosines[:c][seen], cosines[c:]
            out[name] = {"epsilon": estimate(inserted, held_out, last["delta"]),
                         "epsilon_lower_bound": epsilon_lower_bound(inserted, held_out, last["delta"]),
                         "bootstrap_90": bootstrap_interval(inserted, held_out, last["delta"]),
                         "noise_floor": noise_floor(len(inserted), len(held_out), last["delta"]),
                         "inserted_mean_std": gaussian_fit(inserted) if len(inserted) > 1 else None,
                         "held_out_mean_std": gaussian_fit(held_out)}
        out["delta"] = last["delta"]
        low, high = out["all_rounds"]["bootstrap_90"]
        if out["canaries_inserted"] < FEW_INSERTED or high > 2 * low:
            log.warning("audit=epsilon: %d canaries inserted; the estimate %.3g moves over %.3g..%.3g when they are "
                        "redrawn (bootstrap 90%%): a point estimate this loose says little; raise "
                        "audit.canary_clients (and sampler.clients_per_round with it) or the rounds",
                        out["canaries_inserted"], out["all_rounds"]["epsilon"], low, high)
        return out

    def state_dict(self) -> dict:
        return {"insertions": self.insertions.tolist(), "max_cosines": self.max_cosines.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.insertions = np.asarray(state["insertions"], dtype=np.int64)
        self.max_cosines = np.asarray(state["max_cosines"], dtype=np.float64)
