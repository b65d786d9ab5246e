"""One round's client updates: vectorized against sequential, on each device."""

import sys

import torch

from fedrun import config
from fedrun.core import ClientJob, RoundContext

dev = sys.argv[1]
for model in ("tiny_gpt", "lstm", "mlp", "logreg"):
    data = (
        ["data=shakespeare", "data.path=.devdata/tinyshakespeare.txt"]
        if model in ("tiny_gpt", "lstm")
        else ["data=synthetic", "data.num_clients=1000"]
    )
    ups = {}
    for backend in ("sequential", "vectorized"):
        cfg = config.compose(
            data
            + [
                f"model={model}",
                "client.optimizer=sgd",
                "client.lr=0.5",
                "client.batch_size=16",
                "client.local_steps=10",
                "client.local_epochs=null",
                f"backend={backend}",
                f"device={dev}",
                "run_dir=/tmp/vc",
            ]
        )
        exp = config.build(cfg)
        w = (
            torch.nn.utils.parameters_to_vector(exp.make_model().parameters())
            .to(exp.device)
            .detach()
        )
        jobs = [ClientJob(k) for k in range(8)]
        ups[backend] = exp.backend.train_cohort(
            w, jobs, RoundContext(round_idx=1, seed=0, num_clients=exp.data.num_clients)
        )
    for a, b in zip(ups["sequential"], ups["vectorized"]):
        err = (a.delta - b.delta).abs().max().item()
        scale = a.delta.abs().max().item()
        print(
            dev,
            model,
            a.client_id,
            f"max|d_seq - d_vec| = {err:.2e}  max|d_seq| = {scale:.2e}  rel {err / scale:.1e}"
            f"  loss {a.train_loss:.6f} {b.train_loss:.6f}",
        )
