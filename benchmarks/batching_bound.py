"""How much any batched training of W1's cohort could gain on this machine: an upper bound.

W1's target asks `backend=vectorized` for 1.5x the floor's client-steps per second. Whatever
the batching (vmap, grouped matmuls, a hand-written kernel), K clients trained together do
the same arithmetic as K clients one after another; batching can only save the per-op
overhead and use bigger, more efficient kernels. The most favourable case of that is one
model taking one SGD step on K clients' batches at once (batch K x 16): it has the batched
computation's kernel sizes without per-client weights (one big `mm` in place of K small
matmuls, one optimizer step in place of K). Its client-steps per second over one client's
(batch 16), at the best K of 2, 5 and 10, bound what training the cohort together can reach.

The step kinds run on the W1 model with real W1 batches, alternating, several times, and the
fastest of each counts (the machine only ever slows a run). Measured at one thread (the
contenders' setting) and at every core the machine has (torch's default for a bare loop).
`python -m benchmarks.batching_bound [lstm tiny_gpt]`.
"""
from __future__ import annotations

import os
import sys
import time

import torch
from hydra.utils import get_class

from benchmarks import bare
from benchmarks.workloads import w1
from fedrun.config import build_data, compose

BATCH = 16  # W1's client batch
COHORT = 10  # W1's clients per round
GROUPS = (2, 5, 10)  # clients whose batches one step takes at once
REPEATS = 3  # alternations of the step kinds


def model_and_tokens(model_name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The W1 model, built as the floor builds it, and every client's training windows."""
    workload = next(w for w in w1(quick=False) if w.name == f"W1 {model_name}")
    cfg = compose(workload.overrides)
    data = build_data(cfg)
    torch.manual_seed(0)
    kwargs = {k: v for k, v in cfg.model.items() if k != "_target_"}
    model = get_class(cfg.model._target_)(**kwargs, **data.model_dims)
    return model, torch.cat([c.train.tokens for c in data.clients])


def seconds_per_step(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean seconds of a plain SGD step over the given token batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    examples = {"tokens": torch.cat(batches)}
    index = [torch.arange(i * len(b), (i + 1) * len(b)) for i, b in enumerate(batches)]
    start = time.perf_counter()  # only the steps are timed
    bare.local_sgd(model, optimizer, examples, index)
    return (time.perf_counter() - start) / len(batches)


def bound(model_name: str, threads: int) -> dict:
    """Client-steps per second of steps on the batches of GROUPS clients at once, over one
    client's steps; the best group size is the bound."""
    torch.set_num_threads(threads)
    model, tokens = model_and_tokens(model_name)
    g = torch.Generator().manual_seed(0)
    # COHORT client-steps of each kind: COHORT steps of one client's batch, COHORT / k steps
    # each on k clients' batches.
    kinds = {k: [tokens[torch.randint(len(tokens), (BATCH * k,), generator=g)] for _ in range(COHORT // k)]
             for k in (1, *GROUPS)}
    for batches in kinds.values():  # warm-up
        seconds_per_step(model, batches[:1])
    best = {k: float("inf") for k in kinds}
    for _ in range(REPEATS):
        for k, batches in kinds.items():
            best[k] = min(best[k], seconds_per_step(model, batches) / k)  # per client-step
    gain = {k: best[1] / best[k] for k in GROUPS}
    return {"model": model_name, "threads": threads,
            "ms_per_client_step": {k: round(1e3 * s, 2) for k, s in best.items()},
            "gain": {k: round(v, 3) for k, v in gain.items()}, "bound": max(gain.values())}


def measure_all(models: list[str] | None = None) -> list[dict]:
    threads = sorted({1, os.cpu_count() or 1})
    return [bound(m, t) for m in models or ["lstm", "tiny_gpt"] for t in threads]


if __name__ == "__main__":
    for row in measure_all(sys.argv[1:] or None):
        print(row, flush=True)
