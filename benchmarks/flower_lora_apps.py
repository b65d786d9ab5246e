"""Flower's apps for W4 (`benchmarks.contender_flower_lora`): the FlowerTune client, timed.

As the ClientApp of Flower's `examples/flowertune-llm` does, each call builds the model: it
loads the base from a local checkpoint (`from_pretrained`), adds the LoRA adapters
(`get_peft_model`), sets the adapters it was sent (`set_peft_model_state_dict`), trains, and
replies with the adapters' weights (`get_peft_model_state_dict`) and its example count.
FlowerTune trains with TRL's SFTTrainer (its own optimizer and schedule); here the training is
the floor's plain SGD on fedrun's batches, with dropout reseeded per client as fedrun does, so
the work is the same as fedrun's and the floor's. Each phase of a call is timed with
perf_counter inside the call and sent back as metrics, and the server logs where each round's
time went. Like `benchmarks.flower_apps` (whose FedAvg and workload loading it reuses), a module
of its own so that Ray pickles the ClientApp by reference.
"""
from __future__ import annotations

import logging
import statistics
from time import perf_counter

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from benchmarks import bare, exported, lora
from benchmarks.flower_apps import TimedFedAvg, work

PHASES = ("build", "load", "train", "reply")  # a call's parts, in order
log = logging.getLogger("benchmarks.w4.flower")

client_app = ClientApp()


def get_model(w: dict):
    """FlowerTune's `get_model`: the base from disk, with fresh adapters."""
    return lora.with_lora(lora.from_directory(w["base_dir"]), w["lora"])


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    from peft import set_peft_model_state_dict

    w, cfg = work(), msg.content["config"]
    client, order_seed = int(cfg["client-id"]), int(cfg["order-seed"])
    t0 = perf_counter()
    model = get_model(w)
    t1 = perf_counter()
    set_peft_model_state_dict(model, msg.content["arrays"].to_torch_state_dict())
    t2 = perf_counter()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=w["client"]["lr"])
    torch.random.default_generator.manual_seed(int(cfg["dropout-seed"]))
    bare.local_sgd(lora.CausalLM(model, w["lora"]["vocab_size"]), optimizer, w["clients"][client],
                   exported.client_batches(w, client, order_seed))
    t3 = perf_counter()
    arrays = ArrayRecord(lora.adapter_state(model))
    t4 = perf_counter()
    seconds = dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)))
    metrics = MetricRecord({"num-examples": bare.size(w["clients"][client])}
                           | {f"seconds-{k}": v for k, v in seconds.items()})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


class ProfiledFedAvg(TimedFedAvg):
    """TimedFedAvg that keeps each round's per-call phase seconds, as the clients measured them."""

    def __init__(self, clock, **kwargs):
        super().__init__(clock, **kwargs)
        self.phases: list[dict[str, list[float]]] = []  # per round: phase -> seconds of each call

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        calls = [r.content["metrics"] for r in replies if r.has_content()]
        self.phases.append({k: [float(m[f"seconds-{k}"]) for m in calls] for k in PHASES})
        log.info("round %d: %d calls; seconds summed over them: %s", server_round, len(calls),
                 ", ".join(f"{k} {sum(v):.2f}" for k, v in self.phases[-1].items()))
        return super().aggregate_train(server_round, replies)

    def phase_summary(self, warmup: int) -> dict:
        """Per phase: the median seconds of one call and the median per round (summed over its
        calls), over the rounds the clock times (not the first `warmup`, nor the last)."""
        timed = self.phases[warmup:-1] or self.phases
        return {k: {"per_call": statistics.median(s for r in timed for s in r[k]),
                    "per_round": statistics.median(sum(r[k]) for r in timed)} for k in PHASES}
