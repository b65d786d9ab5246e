"""Logit-exchange federated distillation: FedMD (Li & Wang 2019, "FedMD: Heterogenous Federated
Learning via Model Distillation") and DS-FL (Itahara et al. 2020, "Distillation-Based
Semi-Supervised Federated Learning for Communication-Efficient Collaborative Training").

Clients never send weights. Each round the server picks `public_batch` windows of a public
corpus (never client data) from its own seeded stream; every sampled client predicts them
after its local training and sends softmax(logits / T). The server averages the predictions
into a consensus, which goes down with the next round and which each client digests
(`fedrun.strategies.fed_distill_client`). DS-FL's entropy-reduction aggregation (ERA) sharpens
the mean: softmax(mean / era_temperature). Central DP, when on, clips each client's prediction
vector and noises their mean (the privacy mechanism does it, as for weight updates); the
server then projects the noisy mean back onto distributions (post-processing).

Because only predictions are shared, clients may hold different architectures
(`client.models`); `ClientModels` keeps every client's weights (client-side state, simulated)
and reports each architecture's test metrics.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated

import torch
import torch.nn.functional as F

from fedrun.client_config import ClientConfig
from fedrun.components import OneOf, Range
from fedrun.core import ClientUpdate, FedrunError, RoundContext, Stream, torch_generator
from fedrun.data.examples import FederatedData, Windows, concat
from fedrun.privacy.local_dp import ExampleDP
from fedrun.strategies.client_models import ClientModels, ModelSpec
from fedrun.strategies.fed_distill_client import DistillJob, DistillTrainer

AGGREGATIONS = ("mean", "era")
DIGESTS = ("before", "after")  # when clients digest the consensus: before local training (FedMD) or after (DS-FL)


def era(mean: torch.Tensor, temperature: float) -> torch.Tensor:
    """DS-FL's entropy reduction: softmax(p / T) over the vocabulary of the averaged distributions."""
    return F.softmax(mean / temperature, dim=-1)


def as_distributions(mean: torch.Tensor) -> torch.Tensor:
    """Noisy means (central DP) back onto the simplex: negative mass cut, rows renormalised."""
    clipped = mean.clamp_min(0)
    total = clipped.sum(-1, keepdim=True)
    uniform = torch.full_like(clipped, 1 / clipped.shape[-1])
    return torch.where(total > 0, clipped / total.clamp_min(1e-30), uniform)


@dataclass
class Digest:
    """How clients learn from the consensus."""

    temperature: float
    steps: int
    batch: int
    after: bool  # digest after local training (DS-FL) rather than before (FedMD)
    topk_logits: int | None


class FedDistill:
    """The server of logit exchange: picks public windows, averages predictions, keeps no weights."""

    exchanges = "logits"
    config_nodes = {"public": "data"}  # the public corpus, a data source the run builds

    def __init__(self, *, aggregation: Annotated[str, OneOf(*AGGREGATIONS)],
                 era_temperature: Annotated[float, Range(gt=0)], temperature: Annotated[float, Range(gt=0)],
                 public_batch: Annotated[int, Range(ge=1)], digest_steps: Annotated[int, Range(ge=0)],
                 digest_batch: Annotated[int, Range(ge=1)], digest: Annotated[str, OneOf(*DIGESTS)],
                 topk_logits: Annotated[int, Range(ge=1)] | None, eval_clients: Annotated[int, Range(ge=1)],
                 public: FederatedData, model_specs: list[ModelSpec], num_clients: int, seed: int,
                 device: torch.device):
        models = ClientModels(model_specs, num_clients=num_clients, seed=seed, device=device, eval_clients=eval_clients)
        self.public_fingerprint = public.fingerprint
        windows = concat([c.train for c in public.clients])
        if not isinstance(windows, Windows):
            raise FedrunError("strategy.public: logit exchange predicts public text; the public corpus must be a "
                              "text source (e.g. pystdlib), not labelled examples")
        self.public = windows
        self.server_model = self.client_state = models  # what the loop evaluates; the clients' own weights
        self.aggregation, self.era_temperature = aggregation, era_temperature
        self.batch = min(public_batch, len(self.public))
        self.digest = Digest(temperature, digest_steps, digest_batch, digest == "after", topk_logits)
        self.seed = seed
        seq_len = self.public.tokens.shape[1] - 1  # windows hold T + 1 bytes
        self.update_size = self.batch * seq_len * models.vocab_size  # B * T * V probabilities
        self._round = 0  # the round in progress
        self._consensus_round = 0  # the round whose public windows the consensus predicts (0: none yet)

    def make_trainer(self, cfg: ClientConfig, device: torch.device,
                     example_dp: ExampleDP | None = None) -> Callable[[], DistillTrainer]:
        d = self.digest
        return partial(DistillTrainer, self.server_model.make_models, cfg, device, example_dp,
                       temperature=d.temperature, digest_steps=d.steps, digest_batch=d.batch,
                       digest_after=d.after, topk_logits=d.topk_logits)

    def windows(self, round_idx: int) -> torch.Tensor:
        """(B, T) public inputs of a round, drawn without replacement from the server's stream."""
        g = torch_generator(self.seed, Stream.PUBLIC, round_idx)
        idx = torch.randperm(len(self.public), generator=g)[: self.batch]
        return self.public[idx].inputs_targets(torch.device("cpu"))[0]

    def begin_round(self, ctx: RoundContext) -> None:
        self._round = ctx.round_idx
        self._predict_x = self.windows(ctx.round_idx)
        self._digest_x = self.windows(self._consensus_round) if self._consensus_round else None

    def client_job(self, client_id: int) -> DistillJob:
        return DistillJob(client_id=client_id, state={"weights": self.server_model.weights_of(client_id)},
                          arch=int(self.server_model.arch_of[client_id]), digest_x=self._digest_x,
                          predict_x=self._predict_x)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> torch.Tensor:
        """The plain mean of the clients' predictions (every client counts once, as in FedMD)."""
        return torch.stack([u.delta for u in updates]).mean(0)

    def apply(self, weights: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new consensus (the aggregate is not a step from the old one: it replaces it)."""
        mean = as_distributions(delta.view(self.batch, -1, self.server_model.vocab_size))
        consensus = era(mean, self.era_temperature) if self.aggregation == "era" else mean
        self._consensus_round = self._round
        return consensus.reshape(-1)

    def state_dict(self) -> dict:
        return {"consensus_round": self._consensus_round, "clients": self.server_model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._consensus_round = state["consensus_round"]
        self.server_model.load_state_dict(state["clients"])

