"""The top-level keys of a run's config (conf/config.yaml), typed and ranged: their schema."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fedrun.components import LocalPath, OneOf, Range

DEVICES = ("auto", "cpu", "cuda")
OBJECTIVES = ("eval_loss", "eval_ppl", "eval_acc")
# The config groups: each holds one component (`_target_`) except `client` (ClientConfig), `eval`
# (EvalSettings) and `logger` (a set of switches, read by fedrun/loggers.py).
COMPONENT_GROUPS = ("data", "model", "sampler", "strategy", "privacy", "backend", "attack", "audit", "compression")
GROUPS = (*COMPONENT_GROUPS, "client", "eval", "logger")


@dataclass(frozen=True)
class RunSettings:
    name: str  # used in the default run_dir
    rounds: Annotated[int, Range(ge=1)]
    seed: Annotated[int, Range(ge=0)]
    device: Annotated[str, OneOf(*DEVICES)]
    run_dir: str
    eval_every: Annotated[int, Range(ge=1)]
    checkpoint_every: Annotated[int, Range(ge=1)]
    checkpoint_keep: Annotated[int, Range(ge=1)] | None
    objective: Annotated[str, OneOf(*OBJECTIVES)]
    threads: str  # torch's CPU threads: auto (usable cores / parallel sweep jobs) or an integer; fedrun/threads.py


@dataclass(frozen=True)
class EvalSettings:
    """The `eval` node: what each evaluation measures besides the test loss (fedrun/response_eval.py)."""

    samples: Annotated[int, Range(ge=0)]  # greedy responses to this many held-out prompts (samples.jsonl); 0: off
    choices: LocalPath | None  # a JSONL file of multiple-choice questions (eval_mc_acc, eval_mc_acc_norm); null: off
    per_client: bool  # each client on its own test split: clients_eval.csv, eval_client_ppl_mean/_p10/_p90
    clients: Annotated[int, Range(ge=1)] | None  # with per_client: a seeded sample of this many clients; null: all
