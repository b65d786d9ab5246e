"""Flower's simulation engine (flwr 1.42, Ray backend) on W4: federated LoRA fine-tuning with the
FlowerTune client pattern (the apps are in `benchmarks.flower_lora_apps`).

The ServerApp runs Flower's FedAvg over the adapters' state dicts, from fedrun's initial adapters;
Ray as for the other workloads (`benchmarks.contender_flower`). Besides the usual figures, the
result holds where a call's time goes (`client_phases`: building the model, loading the sent
adapters, training, packing the reply). Runs in `.venv-bench`:
`python -m benchmarks.contender_flower_lora SPEC RESULT`.
"""
from __future__ import annotations

import json
import logging
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from flwr.app import ArrayRecord, Context  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from benchmarks import bare, lora  # noqa: E402
from benchmarks.flower_apps import SIMULATION_BACKEND, work  # noqa: E402
from benchmarks.flower_lora_apps import ProfiledFedAvg, client_app, get_model  # noqa: E402
from benchmarks.measure import RoundClock  # noqa: E402


def final_loss(w: dict, adapters: dict) -> float:
    from peft import set_peft_model_state_dict

    model = get_model(w)
    set_peft_model_state_dict(model, adapters)
    return bare.eval_loss(lora.CausalLM(model, w["lora"]["vocab_size"]), w["test"])


def main(spec_path: str, result_path: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    spec = json.loads(open(spec_path).read())
    clock, final = RoundClock(), {}
    num_clients = len(work()["clients"])
    server_app = ServerApp()

    @server_app.main()
    def server(grid: Grid, context: Context) -> None:
        w = work()
        strategy = ProfiledFedAvg(clock, fraction_evaluate=0.0, min_available_nodes=num_clients)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(dict(w["init"])), num_rounds=w["rounds"])
        final["adapters"] = result.arrays.to_torch_state_dict()
        final["phases"] = strategy.phase_summary(spec["warmup"])

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_clients,
                   backend_config=SIMULATION_BACKEND)
    clock.report(result_path, eval_loss=final_loss(work(), final["adapters"]), warmup=spec["warmup"],
                 client_phases=final["phases"])


if __name__ == "__main__":
    main(*sys.argv[1:])
