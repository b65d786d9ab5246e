"""Flower's simulation engine (flwr 1.42, Ray backend) on an exported workload.

The apps are in `benchmarks.flower_apps`. Runs in `.venv-bench`:
`python -m benchmarks.contender_flower SPEC RESULT`.
"""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from flwr.app import ArrayRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from benchmarks import bare, exported  # noqa: E402
from benchmarks.flower_apps import SIMULATION_BACKEND, TimedFedAvg, client_app, work  # noqa: E402
from benchmarks.measure import RoundClock  # noqa: E402


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

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_config=SIMULATION_BACKEND)
    model = exported.make_model(work())
    model.load_state_dict(final["state"])
    clock.report(result_path, eval_loss=bare.eval_loss(model, work()["test"]), warmup=spec["warmup"])


if __name__ == "__main__":
    main(*sys.argv[1:])
