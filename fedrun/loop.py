"""The federated round loop: sample, train locally, aggregate, update, evaluate, record."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn

from fedrun.core import (Backend, ClientHook, ClientJob, ClientUpdate, Mechanism, RoundContext, Sampler, Strategy,
                         Stream, derive_seed)
from fedrun.data.examples import FederatedData
from fedrun.evaluation import evaluate
from fedrun.params import flatten_parameters
from fedrun.rundir import RunDir
from fedrun.sampling import drop_out

log = logging.getLogger(__name__)

METRIC_COLUMNS = ["round", "clients", "examples", "train_loss", "eval_loss", "eval_ppl", "eval_acc",
                  "bytes_up", "bytes_down", "seconds", "sampled", "reported", "dropped"]
CLIENT_COLUMNS = ["round", "client_id", "examples", "train_loss", "update_norm", "seconds", "status", "local_steps"]


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


def initial_model(exp: Experiment) -> tuple[nn.Module, torch.Tensor]:
    """The global model (seeded from the INIT stream) and its flat weight vector."""
    torch.manual_seed(derive_seed(exp.cfg.seed, Stream.INIT))
    model = exp.make_model().to(exp.device)
    return model, flatten_parameters(model)


def run(exp: Experiment, rundir: RunDir, *, on_round: Callable[[dict], None] | None = None) -> dict:
    """Run every round, writing each round's rows as it finishes; return the summary."""
    cfg = exp.cfg
    model, flat = initial_model(exp)
    weights = flat.detach().clone()
    test = exp.data.test_examples()
    num_examples = np.array([c.num_examples for c in exp.data.clients])
    metrics = rundir.table("metrics.csv", METRIC_COLUMNS)
    clients = rundir.table("clients.csv", CLIENT_COLUMNS)
    started = time.perf_counter()
    history = [{"round": 0, "clients": 0, "examples": 0, "bytes_up": 0, "bytes_down": 0,
                **evaluate(model, test, exp.device), "seconds": time.perf_counter() - started}]
    metrics.append(history[-1:])
    for round_idx in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        ctx = RoundContext(round_idx=round_idx, seed=cfg.seed, num_clients=exp.data.num_clients)
        ctx.cohort = exp.sampler.sample(num_examples, ctx)
        reporting, dropped = drop_out(ctx.cohort, exp.sampler.dropout, ctx)
        jobs = {cid: exp.strategy.client_job(cid) for cid in ctx.cohort}
        updates = exp.backend.train_cohort(weights, [jobs[cid] for cid in reporting], ctx)
        if updates:
            delta = exp.mechanism.on_aggregate(exp.strategy.aggregate(updates), ctx)
            weights = exp.strategy.apply(weights, delta)
        else:
            log.warning("round %d: no client reported (%d sampled); the global model is kept", round_idx, len(ctx.cohort))
        row = round_row(round_idx, updates, weights, jobs=list(jobs.values()), dropped=len(dropped))
        if round_idx % cfg.eval_every == 0 or round_idx == cfg.rounds:
            flat.copy_(weights)
            row.update(evaluate(model, test, exp.device))
        row["seconds"] = time.perf_counter() - t0
        metrics.append([row])
        clients.append(client_rows(round_idx, updates, dropped, exp.data))
        if round_idx % cfg.checkpoint_every == 0 or round_idx == cfg.rounds:
            rundir.save_checkpoint(round_idx, checkpoint_state(exp, weights, round_idx))
        history.append(row)
        log.info("round %d: %s", round_idx, {k: v for k, v in row.items() if v is not None})
        if on_round is not None:
            on_round(row)
    flat.copy_(weights)
    rundir.save_model(model, {"round": str(cfg.rounds)})
    return summarize(history, seconds=time.perf_counter() - started)


def round_row(round_idx: int, updates: list[ClientUpdate], weights: torch.Tensor, *,
              jobs: list[ClientJob], dropped: int) -> dict:
    """The round's metrics.csv row before evaluation; train_loss is example-weighted.

    The global weights (and any strategy state, e.g. SCAFFOLD's c) go down to every sampled
    client, dropped ones included; updates come up from those that report."""
    examples = sum(u.num_examples for u in updates)
    return {
        "round": round_idx,
        "clients": len(updates),
        "examples": examples,
        "train_loss": sum(u.train_loss * u.num_examples for u in updates) / examples if updates else None,
        "bytes_up": sum(u.bytes_up for u in updates),
        "bytes_down": sum(weights.numel() * weights.element_size() + j.extra_bytes for j in jobs),
        "sampled": len(jobs),
        "reported": len(updates),
        "dropped": dropped,
    }


def client_rows(round_idx: int, updates: list[ClientUpdate], dropped: list[int], data: FederatedData) -> list[dict]:
    rows = [{"round": round_idx, "client_id": u.client_id, "examples": u.num_examples,
             "train_loss": u.train_loss, "update_norm": u.update_norm, "seconds": u.seconds,
             "status": "byzantine" if u.malicious else "ok", "local_steps": u.num_steps} for u in updates]
    rows += [{"round": round_idx, "client_id": c, "examples": data.clients[c].num_examples, "status": "dropped"}
             for c in dropped]
    return rows


def checkpoint_state(exp: Experiment, weights: torch.Tensor, round_idx: int) -> dict:
    """Everything a resumed run needs: with derived randomness, the seed restores every stream."""
    return {"round": round_idx, "weights": weights.detach().cpu(), "strategy": exp.strategy.state_dict(),
            "rng": {"seed": exp.cfg.seed, "torch": torch.get_rng_state()}}


def summarize(history: list[dict], *, seconds: float) -> dict:
    evaluated = [r for r in history if r.get("eval_loss") is not None]
    best = min(evaluated, key=lambda r: r["eval_loss"])
    keys = ("eval_loss", "eval_ppl", "eval_acc")
    return {
        "rounds": history[-1]["round"],
        "initial": {k: history[0][k] for k in keys},
        "final": {k: evaluated[-1][k] for k in keys} | {"round": evaluated[-1]["round"]},
        "best": {k: best[k] for k in keys} | {"round": best["round"]},
        "bytes_up": sum(r["bytes_up"] for r in history),
        "bytes_down": sum(r["bytes_down"] for r in history),
        "seconds": seconds,
    }
