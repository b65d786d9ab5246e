"""Seconds per round of fedrun's sequential and vectorized backends on CUDA (benchmarks/device/run.sh)."""

import json
import os
import time

import numpy as np
import torch

from fedrun import config
from fedrun.train import train

SH = ".devdata/tinyshakespeare.txt"
W1 = [
    "data=shakespeare",
    f"data.path={SH}",
    "client.optimizer=sgd",
    "client.lr=0.5",
    "client.batch_size=16",
    "client.local_steps=10",
    "client.local_epochs=null",
    "sampler.clients_per_round=10",
    "seed=0",
]
W2 = [
    "data=synthetic",
    "data.num_clients=1000",
    "client.optimizer=sgd",
    "client.lr=0.01",
    "client.batch_size=10",
    "client.local_steps=null",
    "client.local_epochs=1",
    "sampler.clients_per_round=100",
    "seed=0",
]
CASES = [
    ("W1 tiny_gpt", W1 + ["model=tiny_gpt"], 6),
    ("W1 lstm", W1 + ["model=lstm"], 4),
    ("W2 logreg", W2 + ["model=logreg"], 6),
    ("W2 mlp", W2 + ["model=mlp"], 6),
    ("W1 tiny_gpt k100", W1 + ["model=tiny_gpt", "sampler.clients_per_round=100"], 4),
]
out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "results": []}
for name, ov, rounds in CASES:
    for device in ("cuda", "cpu") if name.startswith("W2") else ("cuda",):
        for backend in ("sequential", "vectorized"):
            cfg = config.compose(
                ov
                + [
                    f"backend={backend}",
                    f"device={device}",
                    f"rounds={rounds}",
                    "eval_every=1000000",
                    "checkpoint_every=1000000",
                    "logger=[csv]",
                    f"run_dir=/tmp/gb/{name.replace(' ', '_')}_{device}_{backend}",
                ]
            )
            exp = config.build(cfg)
            ts = []

            def on_round(row, ts=ts, device=device):
                if device == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter())

            t0 = time.perf_counter()
            _, summary = train(exp, on_round=on_round)
            d = np.diff(ts)[1:-1]  # leave out the warm-up and the last (eval) round
            r = {
                "workload": name,
                "device": device,
                "backend": backend,
                "s_per_round": float(np.median(d)),
                "rounds": [round(float(x), 4) for x in np.diff(ts)],
                "eval_loss": summary["final"]["eval_loss"],
                "wall": time.perf_counter() - t0,
            }
            print(json.dumps(r), flush=True)
            out["results"].append(r)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu_bench.json"), "w") as f:
    json.dump(out, f, indent=1)
