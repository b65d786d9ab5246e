"""Flower's apps for `benchmarks.contender_flower`: a ClientApp and a timed FedAvg.

They live in a module of their own because Ray ships the ClientApp to its actors by
pickling it: defined in the `__main__` script it would be pickled by value, with the loaded
workload (every client's data) inside, once per SuperNode, which ran 1,000 SuperNodes out
of memory. Here it is pickled by reference and each process loads the workload once.

A ServerApp runs Flower's message-based FedAvg; a ClientApp trains one client per message,
as Flower's quickstarts do: it builds the model, loads the arrays it was sent, trains with
the shared plain-PyTorch loop and returns its weights and example count. One virtual
SuperNode per client of the population; each round the strategy picks as many nodes as
fedrun samples clients, and each message names which client's data to train on (fedrun's
cohort, batch order and dropout seed), so the work is the same as the floor's. Ray listens on loopback,
with 2 CPUs and a small object store.
"""
from __future__ import annotations

import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from benchmarks import bare, exported
from benchmarks.measure import RoundClock

WORK_PATH = os.environ.get("BENCH_EXPORT", "")
_work: dict | None = None  # loaded once per process (driver and each Ray actor)


# Ray on loopback, one CPU a client, two at once: how every Flower contender runs its simulation.
SIMULATION_BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                      "init_args": {"num_cpus": 2, "object_store_memory": 256 * 1024 * 1024,
                                    "_node_ip_address": "127.0.0.1", "log_to_driver": False}}


def work() -> dict:
    global _work
    if _work is None:
        _work = exported.load(WORK_PATH)
    return _work


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    w = work()
    cfg = msg.content["config"]
    client, seed = int(cfg["client-id"]), int(cfg["order-seed"])
    model = exported.make_model(w)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=w["client"]["lr"])
    bare.local_sgd(model, optimizer, w["clients"][client], exported.client_batches(w, client, seed))
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"num-examples": bare.size(w["clients"][client])})})
    return Message(content=reply, reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg whose round r goes to fedrun's cohort of round r, timed from configure to aggregate."""

    def __init__(self, clock: RoundClock, **kwargs):
        super().__init__(**kwargs)
        self.clock = clock

    def configure_train(self, server_round, arrays, config, grid):
        self.clock.start_round()
        w = work()
        ids, seeds = w["cohorts"][server_round - 1], w["order_seeds"][server_round - 1]
        dropout_seeds = w["dropout_seeds"][server_round - 1]
        nodes, _ = sample_nodes(grid, self.min_available_nodes, len(ids))
        return [Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
                    {"client-id": c, "order-seed": s, "dropout-seed": d, "server-round": server_round})}),
                        message_type=MessageType.TRAIN, dst_node_id=node)
                for node, c, s, d in zip(nodes, ids, seeds, dropout_seeds)]

    def aggregate_train(self, server_round, replies):
        result = super().aggregate_train(server_round, replies)
        self.clock.end_round()
        return result
