"""Loading a run's model, sampling from it, and evaluating it again."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from fedrun import config, generate, train
from fedrun.core import FedrunError
from fedrun.params import flatten_parameters
from fedrun.rundir import load_checkpoint
from tests.conftest import TINY, make_play


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished two-round tiny run on a generated play."""
    root = tmp_path_factory.mktemp("gen")
    play = make_play(root / "play.txt")
    cfg = config.compose([f"run_dir={root / 'run'}", "data=shakespeare", f"data.path={play}", "device=cpu", *TINY,
                          "checkpoint_every=1"])
    return train.train(config.build(cfg))[0]


@pytest.fixture(scope="module")
def model(run):
    return generate.load_model(run, device="cpu")[0]


def test_final_model_equals_last_checkpoint(run, model):
    last = load_checkpoint(run / "checkpoints" / "round_0002.pt")["weights"]
    assert torch.equal(flatten_parameters(model), last)
    at_round, _ = generate.load_model(run, round=2, device="cpu")
    assert torch.equal(flatten_parameters(at_round), last)
    first, _ = generate.load_model(run, round=1, device="cpu")
    assert not torch.equal(flatten_parameters(first), last)


def greedy(model, prompt: bytes, n: int) -> bytes:
    """An independent greedy decoder: full forward over the cropped context, argmax at the end."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ctx = torch.tensor([ids[-model.seq_len:]])
            ids.append(int(model(ctx)[0, -1].argmax()))
    return bytes(ids)


def test_greedy_is_deterministic_and_matches_a_hand_loop(model):
    prompt = b"SPEAKER A:\nThe "  # 15 bytes; 30 new ones run past seq_len=16, exercising the crop
    out = generate.generate(model, prompt, max_new_tokens=30, temperature=0, top_k=None, seed=0, device="cpu")
    assert len(out) == len(prompt) + 30 and out.startswith(prompt)
    assert out == generate.generate(model, prompt, max_new_tokens=30, temperature=0, top_k=None, seed=5,
                                    device="cpu")
    assert out == greedy(model, prompt, 30)
    top1 = generate.generate(model, prompt, max_new_tokens=30, temperature=1.0, top_k=1, seed=3, device="cpu")
    assert top1 == out


def test_sampling_is_seeded(model):
    def sample(seed: int) -> bytes:
        return generate.generate(model, b"T", max_new_tokens=40, temperature=1.5, top_k=None, seed=seed,
                                 device="cpu")

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    assert len(sample(1)) == 41


def test_top_k_keeps_only_the_k_most_likely():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    drawn = {int(generate.next_token(logits, 1.0, 2, g)) for _ in range(200)}
    assert drawn == {1, 3}


def test_evaluate_run_reproduces_final_eval_loss(run):
    with open(run / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    result = generate.evaluate_run(run, [], round=None, device="cpu")
    assert result["eval_loss"] == pytest.approx(float(last["eval_loss"]), abs=1e-6)
    assert result["data"]["seq_len"] == 16
    first = generate.evaluate_run(run, [], round=1, device="cpu")
    with open(run / "metrics.csv") as f:
        row1 = list(csv.DictReader(f))[1]
    assert first["eval_loss"] == pytest.approx(float(row1["eval_loss"]), abs=1e-6)


def test_evaluate_run_on_other_data(run, tmp_path):
    other = make_play(tmp_path / "other.txt", seed=7)
    result = generate.evaluate_run(run, ["data=shakespeare", f"data.path={other}", "data.seq_len=16",
                                         "data.min_samples=4"], round=None, device="cpu")
    assert "other.txt" in str(result["data"])
    assert result["eval_loss"] > 0
    with pytest.raises(FedrunError, match="data.seq_len"):
        generate.evaluate_run(run, ["data.seq_len=32"], round=None, device="cpu")
    with pytest.raises(FedrunError, match="not supported"):
        generate.evaluate_run(run, ["model.n_layer=2"], round=None, device="cpu")


def test_errors(run, tmp_path):
    with pytest.raises(FedrunError, match=r"no checkpoint of round 7; available: 1, 2"):
        generate.load_model(run, round=7, device="cpu")
    with pytest.raises(FedrunError, match="not a run directory"):
        generate.load_model(tmp_path, device="cpu")
    with pytest.raises(FedrunError, match="prompt"):
        generate.generate(torch.nn.Identity(), b"", max_new_tokens=1, temperature=0, top_k=None, seed=0,
                          device="cpu")
