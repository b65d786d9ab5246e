"""Flower's simulation engine (flwr 1.42, Ray backend) on an exported workload.

A ServerApp runs Flower's message-based FedAvg; a ClientApp trains one client per message,
as Flower's quickstarts do: it builds the model, loads the arrays it was sent, trains with
the shared plain-PyTorch loop and returns its weights and example count. One virtual
SuperNode per client of the population; each round the strategy picks as many nodes as
fedrun samples clients, and each message names which client's data to train on (fedrun's
cohort and batch order), so the work is the same as the floor's. Ray listens on loopback,
with 2 CPUs and a small object store. Runs in `.venv-bench`:
`python -m benchmarks.contender_flower SPEC RESULT`.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import sample_nodes  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from benchmarks import bare, exported  # noqa: E402
from benchmarks.measure import RoundClock  # noqa: E402

WORK_PATH = os.environ.get("BENCH_EXPORT", "")
_work: dict | None = None  # loaded once per process (driver and each Ray actor)


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
        nodes, _ = sample_nodes(grid, self.min_available_nodes, len(ids))
        return [Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord(
                    {"client-id": c, "order-seed": s, "server-round": server_round})}),
                        message_type=MessageType.TRAIN, dst_node_id=node)
                for node, c, s in zip(nodes, ids, seeds)]

    def aggregate_train(self, server_round, replies):
        result = super().aggregate_train(server_round, replies)
        self.clock.end_round()
        return result


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    clock, final = RoundClock(), {}
    num_clients = len(work()["clients"])
    server_app = ServerApp()

    @server_app.main()
    def server(grid: Grid, context: Context) -> None:
        w = work()
        strategy = TimedFedAvg(clock, fraction_evaluate=0.0, min_available_nodes=num_clients)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(exported.make_model(w).state_dict()),
                                num_rounds=w["rounds"])
        final["state"] = result.arrays.to_torch_state_dict()

    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
               "init_args": {"num_cpus": 2, "object_store_memory": 256 * 1024 * 1024,
                             "_node_ip_address": "127.0.0.1", "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_config=backend)
    model = exported.make_model(work())
    model.load_state_dict(final["state"])
    clock.report(result_path, eval_loss=bare.eval_loss(model, work()["test"]), warmup=spec["warmup"])


if __name__ == "__main__":
    main(*sys.argv[1:])
