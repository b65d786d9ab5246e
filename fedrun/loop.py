"""The federated round loop: sample, train locally, aggregate, update, evaluate, record."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn

from fedrun.client_eval import CLIENTS_EVAL_COLUMNS, CLIENTS_EVAL_FILE
from fedrun.core import (
    Backend,
    ClientHook,
    FedrunError,
    Mechanism,
    RoundContext,
    Sampler,
    ServerModel,
    StatefulHook,
    Strategy,
)
from fedrun.data.examples import FederatedData
from fedrun.last_round import LastRound
from fedrun.lora import LoRAMethod
from fedrun.privacy.accounting import default_delta
from fedrun.privacy.audit import CanaryAudit
from fedrun.privacy.epsilon_audit import AUDIT_EPSILON_FILE, DIRECTION_COLUMNS, EPSILON_COLUMNS, EpsilonAudit
from fedrun.records import (
    CLIENT_COLUMNS,
    LEDGER_COLUMNS,
    METRIC_COLUMNS,
    client_rows,
    resumed_history,
    round_row,
    summarize,
)
from fedrun.rundir import CsvTable, JsonLines, RunDir
from fedrun.sampling import drop_out

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """Everything a run needs, built from the config by `fedrun.config.build`."""

    cfg: DictConfig
    data: FederatedData
    make_model: Callable[[], nn.Module]
    sampler: Sampler
    strategy: Strategy
    mechanism: Mechanism
    backend: Backend
    device: torch.device
    attack: ClientHook
    server_model: ServerModel
    audit: CanaryAudit | None = None
    compression: StatefulHook | None = None
    lora: LoRAMethod | None = None  # model.lora.aggregation's round-level part (fedsa), if it has one
    typed_paths: dict[str, str] = field(default_factory=dict)  # paths as typed, before they were made absolute

    @property
    def canary_clients(self) -> EpsilonAudit | None:
        """audit=epsilon: the canary clients that join the population, if any."""
        return self.audit if isinstance(self.audit, EpsilonAudit) else None

    @property
    def num_clients(self) -> int:
        """The population the sampler draws from: the data's clients, then any canary clients."""
        canaries = self.canary_clients
        return self.data.num_clients + (canaries.canary_clients if canaries else 0)


def run(exp: Experiment, rundir: RunDir, *, on_round: Callable[[dict], None] | None = None,
        checkpoint: dict | None = None, last_round: LastRound | None = None) -> dict:
    """Run every round (after `checkpoint`'s, when resuming), writing rows as rounds finish."""
    cfg = exp.cfg
    server = exp.server_model
    test = exp.data.test_examples()
    num_examples = exp.data.client_sizes()
    canaries = exp.canary_clients
    if canaries is not None:
        num_examples = canaries.with_canary_sizes(num_examples)
        canaries.start(server.initial_weights())
        audit_table = rundir.table(AUDIT_EPSILON_FILE, DIRECTION_COLUMNS)
    metrics = rundir.table("metrics.csv", METRIC_COLUMNS + exp.mechanism.metric_columns + server.metric_columns
                           + (EPSILON_COLUMNS if canaries else []))
    clients = rundir.table("clients.csv", CLIENT_COLUMNS)
    ledger = rundir.table("privacy_ledger.csv", LEDGER_COLUMNS) if exp.mechanism.metric_columns else None
    if checkpoint is None:
        weights, history = server.initial_weights(), [initial_row(server, test, rundir)]
        metrics.append(history)
        if on_round is not None:
            on_round(history[0])
    else:
        samples = JsonLines(rundir.path / "samples.jsonl")  # eval.samples' responses: cut back as the tables
        per_client = CsvTable(rundir.path / CLIENTS_EVAL_FILE, CLIENTS_EVAL_COLUMNS) \
            if (rundir.path / CLIENTS_EVAL_FILE).exists() else None  # eval.per_client's rows
        weights, history = restore(exp, checkpoint, metrics, [t for t in (clients, ledger, samples, per_client) if t])
    for round_idx in range(history[-1]["round"] + 1, cfg.rounds + 1):
        t0 = time.perf_counter()
        rundir.set_status("running", round_idx=round_idx - 1)
        ctx = RoundContext(round_idx=round_idx, seed=cfg.seed, num_clients=exp.num_clients)
        if not exp.mechanism.allows_round(ctx):
            log.warning("round %d would exceed the privacy budget: stopping (privacy.stop_at_budget)", round_idx)
            break
        ctx.cohort = exp.sampler.sample(num_examples, ctx)
        exp.mechanism.begin_round(ctx)
        exp.strategy.begin_round(ctx)
        reporting, dropped = drop_out(ctx.cohort, exp.sampler.dropout, ctx)
        planted: list[int] = []
        if canaries is not None:  # canary clients train nothing and count in no client metric
            planted = [c for c in reporting if canaries.is_canary(c)]
            reporting = [c for c in reporting if not canaries.is_canary(c)]
            dropped = [c for c in dropped if not canaries.is_canary(c)]
        jobs = {cid: exp.strategy.client_job(cid) for cid in ctx.cohort if cid < exp.data.num_clients}
        if exp.lora is not None:  # e.g. fedsa: each client starts from its own B
            jobs = {cid: exp.lora.client_job(job) for cid, job in jobs.items()}
        # A strategy that trains one model itself (centralized) takes the backend's place.
        train_cohort = getattr(exp.strategy, "train_cohort", exp.backend.train_cohort)
        updates = train_cohort(weights, [jobs[cid] for cid in reporting], ctx)
        sent = [] if canaries is None else canaries.updates(
            planted, ctx, clip_norm=getattr(exp.mechanism, "clip_norm", None), hooks=[exp.mechanism])
        previous, weights = weights, server_step(exp, weights, updates + sent, ctx)
        if canaries is not None:
            canaries.observe(weights - previous)
        row = round_row(round_idx, updates, previous, jobs=list(jobs.values()), dropped=len(dropped))
        row.update(server.round_metrics(previous, updates))
        client_table = client_rows(round_idx, updates, dropped, exp.data,
                                   hide_stats=getattr(exp.mechanism, "hides_client_stats", False))
        del updates, previous, jobs  # the cohort's tensors are not held through evaluation
        evaluating = round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds
        row.update(exp.mechanism.round_metrics(tight=evaluating))
        if evaluating:
            row.update(server.evaluate(weights, test, round_idx=round_idx, run_dir=rundir.path))
        if evaluating and canaries is not None:
            row.update(canaries.estimate(weights, delta=getattr(exp.mechanism, "delta", None)
                                         or default_delta(exp.num_clients)))
            audit_table.replace(canaries.rows())
        row["seconds"] = time.perf_counter() - t0
        metrics.append([row])
        clients.append(client_table)
        if ledger is not None:
            ledger.append(asdict(e) for e in exp.mechanism.round_events(round_idx))
        checkpointed = round_idx % cfg.checkpoint_every == 0 or round_idx == cfg.rounds
        if checkpointed:
            rundir.save_checkpoint(round_idx, checkpoint_state(exp, weights, round_idx), keep=cfg.checkpoint_keep)
        if last_round is not None:  # what Ctrl-C checkpoints before the next periodic checkpoint
            last_round.keep(round_idx, None if checkpointed else partial(checkpoint_state, exp, weights, round_idx))
        history.append(row)
        log.info("round %d: %s", round_idx, {k: v for k, v in row.items() if v is not None})
        if on_round is not None:
            on_round(row)
    server.save(rundir, weights, round_idx=history[-1]["round"])
    return summarize(history) | {"privacy": exp.mechanism.summary(),
                                 "stopped_at_budget": history[-1]["round"] < cfg.rounds} | server.summary()


def initial_row(server: ServerModel, test, rundir: RunDir) -> dict:
    """Round 0: the initial model(s), evaluated before any training."""
    start = time.perf_counter()
    return {"round": 0, "clients": 0, "examples": 0, "bytes_up": 0, "bytes_down": 0,
            **server.evaluate(server.initial_weights(), test, round_idx=0, run_dir=rundir.path),
            "seconds": time.perf_counter() - start}


def restore(exp: Experiment, checkpoint: dict, metrics, others) -> tuple[torch.Tensor, list[dict]]:
    """Resume: the checkpoint's weights and states; every table cut back to its round.

    The run continues from the checkpoint's round, never from the last row written: the history
    (rows 0..round) must be whole, which is checked before any table is rewritten."""
    history = resumed_history(metrics.intact_rows(), checkpoint["round"])
    exp.strategy.load_state_dict(checkpoint["strategy"])
    exp.mechanism.load_state_dict(checkpoint["privacy"])
    if exp.compression is not None:
        exp.compression.load_state_dict(checkpoint["compression"])
    if exp.lora is not None:
        exp.lora.load_state_dict(checkpoint["lora"])
    if exp.canary_clients is not None:
        exp.canary_clients.load_state_dict(checkpoint["audit"])
    for table in (metrics, *others):
        table.truncate_after(checkpoint["round"])
    return checkpoint["weights"].to(exp.device), history


def server_step(exp: Experiment, weights: torch.Tensor, updates, ctx: RoundContext) -> torch.Tensor:
    """Aggregate (through the privacy mechanism) and apply the strategy's server update."""
    previous = weights
    delta = exp.mechanism.aggregate(updates, ctx, exp.strategy)
    if delta is None:
        log.warning("round %d: no aggregate (%d of %d sampled reported); the global model is kept",
                    ctx.round_idx, len(updates), len(ctx.cohort))
        return weights
    weights = exp.strategy.apply(weights, delta)
    if exp.lora is not None:  # e.g. flexlora: the SVD of the clients' mean product replaces the mean factors
        weights = exp.lora.server_step(previous, weights, updates)
    if not torch.isfinite(weights).all():
        raise FedrunError(f"training diverged: the global weights are not finite after round {ctx.round_idx}")
    return weights


def checkpoint_state(exp: Experiment, weights: torch.Tensor, round_idx: int) -> dict:
    """Everything a resumed run needs: with derived randomness, the seed restores every stream."""
    return {"round": round_idx, "weights": weights.detach().cpu(), "strategy": exp.strategy.state_dict(),
            "privacy": exp.mechanism.state_dict(),
            "compression": exp.compression.state_dict() if exp.compression is not None else {},
            "lora": exp.lora.state_dict() if exp.lora is not None else {},
            "audit": exp.canary_clients.state_dict() if exp.canary_clients is not None else {},
            "rng": {"seed": exp.cfg.seed, "torch": torch.get_rng_state()}}
