"""Behaviour must not change under refactoring: short runs covering every strategy, privacy option,
attack, compression, dropout, stragglers, distillation, LoRA and backend, whose metrics.csv and
clients.csv (timing columns aside) are stored in tests/regression/ and compared here.

Record (after a deliberate behaviour change, named in its commit): `python -m tests.test_regression`.
The comparison is exact on the platform the expectations were recorded on (same torch, same
machine type); elsewhere floating-point kernels may round differently, so it allows 1e-4.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedrun import config, train
from tests.conftest import make_play

EXPECTED = Path(__file__).parent / "regression"
TIMING = ["seconds", "secagg_seconds"]

LABELLED = ["data=synthetic", "model=logreg", "data.num_clients=12", "data.max_client_examples=40",
            "sampler.clients_per_round=4", "client.local_steps=3", "client.batch_size=8"]
TEXT_DATA = ["data=shakespeare", "data.seq_len=16", "data.min_samples=4", "sampler.clients_per_round=3",
             "client.local_steps=2", "client.batch_size=4"]
TEXT = [*TEXT_DATA, "model.n_layer=1", "model.n_head=2", "model.n_embd=16"]
POISSON_DP = ["privacy=central_dp", "sampler.kind=poisson", "privacy.noise_multiplier=0.7", "privacy.clip_norm=0.05"]
SGD = ["client.optimizer=sgd", "client.lr=0.2"]

CASES: dict[str, list[str]] = {
    "fedavg": LABELLED,
    "fedavgm": [*LABELLED, "strategy=fedavgm"],
    "fedadam": [*LABELLED, "strategy=fedadam"],
    "fedyogi": [*LABELLED, "strategy=fedyogi"],
    "fedadagrad": [*LABELLED, "strategy=fedadagrad"],
    "fedprox_stragglers": [*LABELLED, "strategy=fedprox", "client.local_steps_min=1", "client.local_steps_max=5"],
    "scaffold": [*LABELLED, "strategy=scaffold", *SGD],
    "median_sign_flip": [*LABELLED, "strategy=median", "attack=sign_flip", "attack.fraction=0.25"],
    "trimmed_mean_gaussian": [*LABELLED, "strategy=trimmed_mean", "attack=gaussian", "attack.fraction=0.25"],
    "krum_scale": [*LABELLED, "strategy=krum", "strategy.num_byzantine=0", "attack=scale", "attack.fraction=0.25"],
    "central_dp_adaptive": [*LABELLED, *POISSON_DP, "privacy.adaptive=true", "privacy.clip_count_stddev=2"],
    "central_dp_topk": [*LABELLED, *POISSON_DP, "compression=topk", "compression.fraction=0.2"],
    "central_dp_secure_agg": [*LABELLED, *POISSON_DP, "privacy.secure_agg=true", "data.num_clients=40",
                              "sampler.clients_per_round=20", "privacy.delta=1e-3"],
    "secure_agg_dropout": [*LABELLED, "privacy=secure_agg", "sampler.dropout=0.4"],
    "local_dp": [*LABELLED, "privacy=local_dp", "privacy.noise_multiplier=0.8"],
    "quantize_dropout": [*LABELLED, "compression=quantize", "compression.bits=4", "sampler.dropout=0.3"],
    "tiny_gpt_text": TEXT,
    "lstm_vectorized": [*TEXT_DATA, "model=lstm", "model.hidden_size=16", "model.embed_dim=4", "backend=vectorized"],
    "mlp_vectorized": [*LABELLED, "model=mlp", "model.hidden=8", "backend=vectorized"],
    "process_backend": [*LABELLED, "backend=process", "backend.workers=2"],
    "ray_backend": [*LABELLED, "backend=ray", "backend.workers=2"],
    "feddf": [*TEXT, "strategy=feddf", "strategy.distill_steps=2", "strategy.public.max_client_bytes=512"],
    "fed_distill_hetero": [*TEXT, "strategy=fed_distill", "client=hetero", "strategy.public.max_client_bytes=512",
                           "strategy.digest_steps=2", "strategy.public_batch=4", "strategy.eval_clients=2"],
    "hf_lora": [*TEXT_DATA, "model=hf", "++model.from_config={model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 16}"],
}


def overrides(name: str, play: Path, run_dir: Path) -> list[str]:
    args = [*CASES[name], "rounds=3", "eval_every=1", "checkpoint_every=3", "seed=7", "device=cpu",
            f"run_dir={run_dir}"]
    return args + ([f"data.path={play}"] if "data=shakespeare" in args else [])


def tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name in ("metrics.csv", "clients.csv"):
        frame = pd.read_csv(run_dir / name, dtype=str, keep_default_na=False)
        out[name] = frame.drop(columns=[c for c in TIMING if c in frame.columns])
    return out


def platform_key() -> dict[str, str]:
    return {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()}


def run_case(name: str, tmp: Path) -> dict[str, pd.DataFrame]:
    play = make_play(tmp / "play.txt")
    run_dir, _ = train.train(config.build(config.compose(overrides(name, play, tmp / name))))
    return tables(run_dir)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_short_run_writes_exactly_its_recorded_tables(name, tmp_path):
    if name == "hf_lora":
        pytest.importorskip("peft", reason="model=hf needs the [llm] extra")
    got = run_case(name, tmp_path)
    exact = json.loads((EXPECTED / "platform.json").read_text()) == platform_key()
    for table, frame in got.items():
        want = pd.read_csv(EXPECTED / name / table, dtype=str, keep_default_na=False)
        assert list(frame.columns) == list(want.columns), table
        if exact:
            pd.testing.assert_frame_equal(frame, want, check_exact=True, obj=f"{name}/{table}")
        else:
            numbers = lambda f: f.apply(pd.to_numeric, errors="coerce")  # noqa: E731
            pd.testing.assert_frame_equal(numbers(frame), numbers(want), rtol=1e-4, obj=f"{name}/{table}")


def record(names: list[str]) -> None:
    import tempfile

    EXPECTED.mkdir(exist_ok=True)
    (EXPECTED / "platform.json").write_text(json.dumps(platform_key(), indent=1) + "\n")
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            for table, frame in run_case(name, Path(tmp)).items():
                (EXPECTED / name).mkdir(exist_ok=True)
                frame.to_csv(EXPECTED / name / table, index=False)
        print("recorded", name, flush=True)


if __name__ == "__main__":
    record(sys.argv[1:] or sorted(CASES))
