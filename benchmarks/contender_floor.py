"""The floor: the fewest operations that do a workload's work, in a bare PyTorch loop.

One model; for each round, for each sampled client: load the global weights, take the same
SGD steps on the same batches as fedrun, and fold the client's delta into an example-weighted
average. Only fedrun's data loading and its derived seeds (which clients a round samples,
each client's batch order and dropout draws) are borrowed, so the batches are identical;
nothing else of fedrun runs. With LoRA (W4's `model=hf`) the model is one PEFT model built by
`benchmarks.lora` (transformers and peft, not fedrun's wrapper), and the weights loaded,
trained and averaged are the adapters' alone. `python -m benchmarks.contender_floor SPEC RESULT`.
"""
from __future__ import annotations

import json
import sys

import torch
from hydra.utils import get_class

from benchmarks import bare, lora
from benchmarks.measure import RoundClock
from fedrun.config import build_data, compose
from fedrun.core import Stream, derive_seed, numpy_rng, torch_generator

HF_MODEL = "fedrun.models.hf.HFCausalLM"  # model=hf: the floor builds the PEFT model itself


def examples_of(ex) -> dict[str, torch.Tensor]:
    """fedrun's Windows / Labelled as the plain dict of tensors `bare` works on."""
    if not hasattr(ex, "tokens"):
        return {"features": ex.features, "labels": ex.labels}
    return {"tokens": ex.tokens} | ({} if ex.mask is None else {"mask": ex.mask})


def lora_spec(cfg, model_dims: dict) -> dict:
    """`model=hf`'s keys as the plain dict `benchmarks.lora` builds from."""
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True)
    if model["name_or_path"] is not None or not model["lora"]["enabled"] or model["lora"]["aggregation"] != "avg":
        raise ValueError("the floor builds model=hf from model.from_config with LoRA averaged (aggregation=avg)")
    return {"from_config": model["from_config"], "lora": model["lora"], "init_seed": model["init_seed"],
            **model_dims}


def make_model(cfg, model_dims: dict) -> torch.nn.Module:
    """The workload's model as fedrun's global model starts: drawn after seeding the INIT stream."""
    torch.manual_seed(derive_seed(cfg.seed, Stream.INIT))
    if cfg.model._target_ == HF_MODEL:
        spec = lora_spec(cfg, model_dims)
        return lora.CausalLM(lora.with_lora(lora.base_model(spec), spec), spec["vocab_size"])
    model_kwargs = {k: v for k, v in cfg.model.items() if k != "_target_"}
    return get_class(cfg.model._target_)(**model_kwargs, **model_dims)


def cohort(seed: int, round_idx: int, *, num_clients: int, k: int) -> list[int]:
    """The round's clients, drawn as fedrun's uniform sampler draws them."""
    rng = numpy_rng(seed, Stream.SAMPLE, round_idx)
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def train_round(model: torch.nn.Module, optimizer, weights: list[torch.Tensor], clients: list[dict],
                ids: list[int], *, seed: int, round_idx: int, client: dict) -> list[torch.Tensor]:
    """New global weights: w + sum_i (n_i / n) (w_i - w), accumulated in float64 (w: the
    trainable parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(bare.size(clients[c]) for c in ids)
    acc = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for c in ids:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        n = bare.size(clients[c])
        order = torch_generator(seed, Stream.CLIENT, round_idx, c)
        torch.random.default_generator.manual_seed(derive_seed(seed, Stream.CLIENT, round_idx, c, 1))  # dropout
        steps = bare.num_steps(n, batch_size=client["batch_size"], local_steps=client["local_steps"],
                               local_epochs=client["local_epochs"])
        bare.local_sgd(model, optimizer, clients[c], bare.epoch_batches(n, client["batch_size"], steps, order))
        with torch.no_grad():
            for a, p, w in zip(acc, params, weights):
                a.add_(p - w, alpha=n / total)
    return [w + a.float() for w, a in zip(weights, acc)]


def run(spec: dict) -> tuple[torch.nn.Module, float]:
    """Train the workload; return the final model and its eval loss (timings go to the clock)."""
    clock = spec["clock"]
    cfg = compose(spec["overrides"])
    if cfg.client.optimizer != "sgd" or cfg.client.momentum or cfg.client.weight_decay:
        raise ValueError("the floor does plain SGD: give client.optimizer=sgd, momentum 0, weight_decay 0")
    data = build_data(cfg)
    clients = [examples_of(c.train) for c in data.clients]
    model = make_model(cfg, data.model_dims)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.client.lr)
    weights = [p.detach().clone() for p in params]
    for round_idx in range(1, cfg.rounds + 1):
        clock.start_round()
        ids = cohort(cfg.seed, round_idx, num_clients=data.num_clients, k=cfg.sampler.clients_per_round)
        weights = train_round(model, optimizer, weights, clients, ids, seed=cfg.seed, round_idx=round_idx,
                              client=dict(cfg.client))
        clock.end_round()
    with torch.no_grad():
        for p, w in zip(params, weights):
            p.copy_(w)
    return model, bare.eval_loss(model, examples_of(data.test_examples()))


def main(spec_path: str, result_path: str) -> None:
    spec = json.loads(open(spec_path).read())
    clock = RoundClock()
    _, loss = run(spec | {"clock": clock})
    clock.report(result_path, eval_loss=loss, warmup=spec["warmup"])


if __name__ == "__main__":
    main(*sys.argv[1:])
