"""The workloads of issue #8 (W1-W3) and issue #18 (W4) as fedrun overrides, and which contenders run each.

Every contender does the same work: the overrides fix the data, the model, plain local SGD
(batch size, steps, learning rate), the cohort size, the rounds and the seed, and every
contender trains fedrun's cohorts on fedrun's batches from fedrun's initial weights.
`BENCH_QUICK=1` keeps one model per workload, three rounds and the small W3 points.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"

# fedrun contenders: name -> backend overrides. A backend runs only if conf/backend has it.
FEDRUN = {
    "fedrun-sequential": ["backend=sequential"],
    "fedrun-vectorized": ["backend=vectorized"],
    "fedrun-process2": ["backend=process", "backend.workers=2"],
    # two workers, each training its share of the round batched (backend=vectorized's training)
    "fedrun-process2-vectorized": ["backend=process", "backend.workers=2", "backend.vectorized=true"],
    "fedrun-ray2": ["backend=ray", "backend.workers=2"],
}
W1_LR = {"lstm": 0.5, "tiny_gpt": 0.5}  # plain SGD, as LEAF trains its Shakespeare LSTM
W2_LR = 0.01  # FedProx's learning rate for Synthetic(1, 1)
W4_LR = 0.1  # plain SGD on the adapters
# W4's model: GPT-2 blocks drawn from a config, 10,868,736 parameters over the 256 byte tokens
# (10,795,008 in the frozen base; LoRA r=8 on each block's c_attn: 73,728 trainable, 6 x (8 x 384 + 1,152 x 8)).
W4_MODEL = ["model=hf", "model.from_config.n_layer=6", "model.from_config.n_embd=384", "model.from_config.n_head=6",
            "model.lora.r=8"]


@dataclass
class Workload:
    name: str  # e.g. "W1 lstm"
    group: str  # W1, W2, W3 or W4
    overrides: list[str]
    contenders: list[str]
    warmup: int = 1
    point: dict = field(default_factory=dict)  # W3: clients per round and population
    repeats: int = 1  # fresh runs of each contender, interleaved with the other workloads' (run.py)
    modules: dict[str, str] = field(default_factory=dict)  # contender -> its module, where not the usual one


def backend_exists(contender: str) -> bool:
    backend = FEDRUN[contender][0].split("=", 1)[1]
    return (ROOT / "conf" / "backend" / f"{backend}.yaml").is_file()


def available(contenders: list[str]) -> list[str]:
    return [c for c in contenders if c not in FEDRUN or backend_exists(c)]


def w1(*, quick: bool) -> list[Workload]:
    """Heavy clients: tinyshakespeare by speaker, 10 clients a round, 10 SGD steps of batch 16."""
    rounds = 3 if quick else 6
    models = ["tiny_gpt"] if quick else ["lstm", "tiny_gpt"]
    contenders = available(["floor", "fedrun-sequential", "fedrun-vectorized", "flower", "pfl"])
    return [Workload(f"W1 {m}", "W1", [
        "data=shakespeare", f"data.path={SHAKESPEARE}", f"model={m}", "client.optimizer=sgd",
        f"client.lr={W1_LR[m]}", "client.batch_size=16", "client.local_steps=10", "client.local_epochs=null",
        "sampler.clients_per_round=10", f"rounds={rounds}", "seed=0"], contenders) for m in models]


def w2(*, quick: bool, has_cap: bool) -> list[Workload]:
    """Light clients: Synthetic(1, 1), 1,000 clients, 100 a round, 1 local epoch of batch 10."""
    rounds = 3 if quick else 8
    models = ["logreg"] if quick else ["logreg", "mlp"]
    contenders = available(["floor", "fedrun-sequential", "fedrun-process2", "fedrun-vectorized",
                            "fedrun-process2-vectorized", "flower", "pfl"])
    # Flower's W2 rounds moved from 1.1 to 2.0 s between two runs an hour apart: two runs each,
    # interleaved, and the least disturbed counts (as for W3).
    return [Workload(f"W2 {m}", "W2", [
        "data=synthetic", "data.num_clients=1000", *(["++data.max_client_examples=null"] if has_cap else []),
        f"model={m}", "client.optimizer=sgd", f"client.lr={W2_LR}",
        "client.batch_size=10", "client.local_steps=null", "client.local_epochs=1",
        "sampler.clients_per_round=100", f"rounds={rounds}", "seed=0"], contenders, repeats=1 if quick else 2)
        for m in models]


# This machine's speed drifts by up to 2x over minutes (a fresh process ran the same W3 point at
# 0.11 or 0.27 s/round, with nothing else running): W3 compares points run minutes apart, so each
# point runs three times, the passes interleaved, and the least disturbed run counts.
W3_REPEATS = 3


def w3(*, quick: bool, has_cap: bool) -> list[Workload]:
    """Scale: clients per round (10, 100, 500) at 1,000 clients; population (1,000 to 100,000)
    at 100 a round. Each client takes 5 SGD steps of batch 10, so a round's work does not
    depend on which clients (of very different sizes) are drawn, and only scale varies."""
    rounds = 3 if quick else 12  # rounds of ~0.1 s: ten timed ones cost little and steady the median
    points = [(10, 1000), (100, 1000)] if quick else [(10, 1000), (100, 1000), (500, 1000), (100, 10000)]
    if not quick and has_cap:
        points.append((100, 100000))
    backends = ["fedrun-sequential", "fedrun-vectorized", "fedrun-process2", "fedrun-ray2"]
    contenders = available(["fedrun-sequential"] if quick else backends)
    cap = ["++data.max_client_examples=200"] if has_cap else []
    return [Workload(f"W3 k={k} N={n}", "W3", [
        "data=synthetic", f"data.num_clients={n}", *cap, "model=logreg", "client.optimizer=sgd",
        f"client.lr={W2_LR}", "client.batch_size=10", "client.local_steps=5", "client.local_epochs=null",
        f"sampler.clients_per_round={k}", f"rounds={rounds}", "seed=0"], contenders,
        point={"clients_per_round": k, "population": n}, repeats=W3_REPEATS) for k, n in points]


def w4(*, quick: bool) -> list[Workload]:
    """Federated LoRA fine-tuning: tinyshakespeare's turns of dialogue as instruction examples
    (one client per responding speaker), W4_MODEL, 10 clients a round, 5 SGD steps of batch 8 on
    the adapters. Each client holds out 5% of its examples (the default 20% would make each
    evaluation, which fedrun runs before round 1 and in the last round, ~2 minutes on one thread)."""
    rounds = 3 if quick else 5  # rounds of ~30-60 s: rounds 2 to 4 are timed
    return [Workload("W4 lora", "W4", [
        "data=shakespeare_dialogue", f"data.path={SHAKESPEARE}", "data.seq_len=128", "data.test_fraction=0.05",
        *W4_MODEL, "client.optimizer=sgd", f"client.lr={W4_LR}", "client.batch_size=8", "client.local_steps=5",
        "client.local_epochs=null", "sampler.clients_per_round=10", f"rounds={rounds}", "seed=0"],
        available(["floor", "fedrun-sequential", "flower"]), modules={"flower": "benchmarks.contender_flower_lora"})]
