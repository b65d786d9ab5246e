"""The client side of logit-exchange distillation (`strategy=fed_distill`).

A client keeps its own model across rounds (its weights come in the job's `state`: state that
lives on the client, never sent). Each round it distils from the server's consensus on the previous round's public
windows (`digest_steps`, before or after local training, as FedMD's "digest" and "revisit"),
trains on its own data with the usual LocalTrainer, then sends its softened predictions
softmax(logits / T) on this round's public windows: B x T x V probabilities, or only the top k
of each distribution (values and indices; the receiver spreads the remaining mass evenly).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fedrun.client import LocalTrainer, batch_indices
from fedrun.client_config import ClientConfig
from fedrun.core import ClientJob, ClientUpdate, RoundContext, Stream, derive_seed, seed_global_rng, torch_generator
from fedrun.data.examples import ClientData
from fedrun.privacy.local_dp import ExampleDP
from fedrun.strategies.feddf import distillation_loss

INDEX_BYTES = 8  # the server names public windows by int64 index: the corpus itself is shared


@dataclass
class DistillJob(ClientJob):
    """What a fed_distill client gets besides the consensus (which comes as the round's `weights`)
    and its own weights (`state["weights"]`, kept on the client)."""

    arch: int = 0  # index of the client's architecture in the strategy's model list
    digest_x: torch.Tensor | None = None  # (B, T) public windows the consensus predicts
    predict_x: torch.Tensor | None = None  # (B, T) this round's public windows

    @property
    def extra_bytes(self) -> int:
        """The indices of the public windows, the consensus's and this round's: the server names
        windows of a corpus every client holds, so the windows themselves are not sent."""
        return INDEX_BYTES * sum(len(x) for x in (self.digest_x, self.predict_x) if x is not None)


def topk_message(probs: torch.Tensor, k: int | None) -> tuple[torch.Tensor, int]:
    """What the server receives, as a dense (..., V) distribution, and the bytes sent for it.

    Top-k: k float32 values and k indices per position; the mass left, 1 - sum(values), is
    spread evenly over the other V - k tokens by the receiver (it needs no extra bytes)."""
    vocab = probs.shape[-1]
    if k is None or k >= vocab:
        return probs, probs.numel() * 4
    values, indices = probs.topk(k, dim=-1)
    rest = ((1 - values.sum(-1, keepdim=True)) / (vocab - k)).clamp_min(0)
    dense = rest.expand_as(probs).clone().scatter_(-1, indices, values)
    index_bytes = 2 if vocab <= 1 << 16 else 4
    return dense, values.numel() * (4 + index_bytes)


class DistillTrainer:
    """One reusable LocalTrainer per architecture; digest, local training, predictions."""

    def __init__(self, make_models: Sequence[Callable[[], nn.Module]], cfg: ClientConfig, device: torch.device,
                 example_dp: ExampleDP | None = None, *, temperature: float, digest_steps: int,
                 digest_batch: int, digest_after: bool, topk_logits: int | None):
        self.make_models, self.cfg, self.device, self.example_dp = list(make_models), cfg, device, example_dp
        self.temperature, self.digest_steps, self.digest_batch = temperature, digest_steps, digest_batch
        self.digest_after, self.topk = digest_after, topk_logits
        self.trainers: dict[int, LocalTrainer] = {}

    def trainer(self, arch: int) -> LocalTrainer:
        if arch not in self.trainers:  # built on first use: a worker may never see some architectures
            self.trainers[arch] = LocalTrainer(self.make_models[arch], self.cfg, self.device, self.example_dp)
        return self.trainers[arch]

    def train(self, job: DistillJob, data: ClientData, weights: torch.Tensor, ctx: RoundContext) -> ClientUpdate:
        """`weights` is the consensus (flat B*T*V probabilities; empty before the first exchange)."""
        start = time.perf_counter()
        trainer = self.trainer(job.arch)
        own = job.state["weights"]
        if not self.digest_after:
            own = self.digest(trainer, own, job, weights, ctx)
        update = trainer.train(job, data, own, ctx)
        own = own + update.delta
        if self.digest_after:
            own = self.digest(trainer, own, job, weights, ctx)
        assert job.predict_x is not None  # the strategy sends this round's windows with every job
        sent, nbytes = topk_message(self.predict(trainer, own, job.predict_x), self.topk)
        return replace(update, delta=sent.reshape(-1), bytes_up=nbytes, seconds=time.perf_counter() - start,
                       extras={"weights": own})

    def digest(self, trainer: LocalTrainer, own: torch.Tensor, job: DistillJob, consensus: torch.Tensor,
               ctx: RoundContext) -> torch.Tensor:
        """`digest_steps` steps of the client optimizer on T^2 KL(consensus || own / T)."""
        if self.digest_steps == 0 or job.digest_x is None or consensus.numel() == 0:
            return own
        x = job.digest_x.to(self.device)
        target = consensus.to(self.device).view(*x.shape, -1)
        trainer.flat.copy_(own)
        trainer.optimizer.reset()
        order = torch_generator(ctx.seed, Stream.CLIENT, ctx.round_idx, job.client_id, 2)
        seed_global_rng(derive_seed(ctx.seed, Stream.CLIENT, ctx.round_idx, job.client_id, 3), self.device)
        trainer.model.train()
        for s, idx in enumerate(batch_indices(len(x), self.digest_batch, self.digest_steps, order)):
            trainer.flat_grad.zero_()
            distillation_loss(trainer.model(x[idx]), target[idx], self.temperature).backward()
            trainer.step(s)
        return trainer.flat.detach().clone()

    @torch.no_grad()
    def predict(self, trainer: LocalTrainer, own: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, T, V) softmax(logits / T) of the client's model on the public windows."""
        trainer.flat.copy_(own)
        trainer.model.eval()
        probs = F.softmax(trainer.model(x.to(self.device)) / self.temperature, dim=-1)
        trainer.model.train()
        return probs.float()
