"""Logit-exchange distillation (strategy=fed_distill): consensus, ERA, top-k messages,
heterogeneous client models, central DP on predictions, resume."""
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fedrun import config, train
from fedrun.cli import app
from fedrun.core import FedrunError, RoundContext
from fedrun.strategies.client_models import assign_architectures
from fedrun.strategies.fed_distill import as_distributions, era
from fedrun.strategies.fed_distill_client import topk_message

PUBLIC = ["strategy=fed_distill", "strategy.public.max_client_bytes=1500", "strategy.public.min_samples=2",
          "strategy.public_batch=8", "strategy.digest_batch=4", "strategy.digest_steps=3"]
# Three architectures small enough for a test: two tiny_gpt widths and an lstm.
HETERO = ["client=hetero", "client.models.0.n_embd=16", "client.models.1.n_embd=32", "client.models.2.hidden_size=16"]


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_mean_and_era_consensus_match_an_independent_computation(compose_cfg):
    exp = config.build(compose_cfg(*PUBLIC))
    strategy = exp.strategy
    rng = np.random.default_rng(0)
    v = strategy.server_model.vocab_size
    preds = [_softmax(3 * rng.normal(size=(strategy.batch, 16, v))) for _ in range(3)]
    updates = [type("U", (), {"delta": torch.tensor(p, dtype=torch.float32).reshape(-1)})() for p in preds]
    mean = strategy.aggregate(updates)
    np.testing.assert_allclose(mean.numpy(), np.mean(preds, 0).reshape(-1), rtol=1e-6, atol=1e-7)
    strategy.begin_round(RoundContext(round_idx=1, seed=0, num_clients=6))
    consensus = strategy.apply(torch.zeros(0), mean).view(strategy.batch, 16, v)
    np.testing.assert_allclose(consensus.numpy(), np.mean(preds, 0), rtol=1e-5, atol=1e-7)
    # DS-FL: softmax(mean / T_era) over the vocabulary; T_era acts on probabilities, so with
    # 256 tokens it must be small to sharpen (at 0.1 it would flatten most distributions).
    strategy.aggregation, strategy.era_temperature = "era", 0.02
    sharpened = strategy.apply(torch.zeros(0), mean).view(strategy.batch, 16, v)
    np.testing.assert_allclose(sharpened.numpy(), _softmax(np.mean(preds, 0) / 0.02), rtol=1e-4, atol=1e-7)
    entropy = lambda p: float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())  # noqa: E731
    assert entropy(sharpened) < entropy(consensus)
    assert era(torch.tensor([[0.5, 0.5]]), 0.1).tolist() == [[0.5, 0.5]]


def test_noisy_means_are_projected_back_onto_distributions():
    noisy = torch.tensor([[0.7, -0.2, 0.5], [-0.1, -0.3, -0.2]])
    got = as_distributions(noisy)
    torch.testing.assert_close(got[0], torch.tensor([0.7, 0.0, 0.5]) / 1.2)
    torch.testing.assert_close(got[1], torch.full((3,), 1 / 3))  # nothing left: uniform


def test_topk_message_keeps_the_top_values_spreads_the_rest_and_counts_its_bytes():
    probs = torch.softmax(torch.randn(2, 3, 10, generator=torch.Generator().manual_seed(0)), -1)
    dense, nbytes = topk_message(probs, 3)
    assert nbytes == 2 * 3 * 3 * (4 + 2)  # float32 values + uint16 indices
    top, idx = probs.topk(3, -1)
    torch.testing.assert_close(dense.gather(-1, idx), top)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 3))
    rest = (1 - top.sum(-1)) / 7
    others = dense.scatter(-1, idx, -1.0)
    torch.testing.assert_close(others[others >= 0].view(2, 3, 7), rest[..., None].expand(2, 3, 7))
    assert topk_message(probs, None) == (probs, probs.numel() * 4)


def test_identical_clients_on_identical_data_reach_a_consensus_equal_to_their_own_predictions(compose_cfg, tmp_path):
    # Four speakers with the same lines: four clients with identical data. Full-batch SGD from
    # one common initial model: every client trains to the same weights.
    speech = "Thou art the thing itself, and that is all.\nWhat is the city but the people?\n"
    play = tmp_path / "same.txt"
    play.write_text("\n".join(f"{who}:\n{speech}" for _ in range(6) for who in ("ANNE", "BEN", "CLEO", "DION")))
    exp = config.build(compose_cfg(*PUBLIC, f"data.path={play}", "rounds=1", "sampler.clients_per_round=4",
                                   "client.optimizer=sgd", "client.lr=0.5", "client.batch_size=100000",
                                   "client.local_steps=1"))
    assert len({c.train.tokens.numpy().tobytes() for c in exp.data.clients}) == 1
    train.train(exp)
    strategy, trainer = exp.strategy, exp.backend.trainer
    x = strategy.windows(1)
    models = strategy.server_model
    assert len(models.weights) == 4
    own = [trainer.predict(trainer.trainer(0), w, x) for w in models.weights.values()]
    mean = torch.stack(own).mean(0)
    for p in own:
        torch.testing.assert_close(p, mean, rtol=1e-5, atol=1e-6)
    # Digesting a consensus equal to one's own predictions leaves the model where it is.
    job = strategy.client_job(0)
    job.digest_x = x
    start = next(iter(models.weights.values()))
    after = trainer.digest(trainer.trainer(0), start, job, own[0].reshape(-1), RoundContext(2, 0, 6))
    torch.testing.assert_close(after, start, rtol=0, atol=1e-6)


def test_three_architectures_train_together_and_each_improves(compose_cfg, tmp_path):
    run_dir, summary = train.train(config.build(compose_cfg(
        *PUBLIC, *HETERO, "rounds=4", "eval_every=4", "sampler.clients_per_round=6", "client.local_steps=8")))
    metrics = pd.read_csv(run_dir / "metrics.csv")
    first, last = metrics.iloc[0], metrics.iloc[-1]
    for name in ("gpt_small", "gpt_wide", "lstm"):
        assert last[f"eval_loss_{name}"] < first[f"eval_loss_{name}"] - 0.05, name
    assert summary["architectures"] == {"gpt_small": {"clients": 2, "params": 10944},
                                        "gpt_wide": {"clients": 2, "params": 34176},
                                        "lstm": {"clients": 2, "params": 10240}}
    with safe_open(str(run_dir / "client_models.safetensors"), "pt") as f:
        assert sorted(k for k in f.keys() if k.startswith("client_")) == [f"client_{c}" for c in range(6)]


def test_bytes_are_the_predictions_sent_and_the_consensus_received(compose_cfg, tmp_path):
    def bytes_of(name, *extra):
        run_dir, _ = train.train(config.build(compose_cfg(*PUBLIC, "rounds=2", f"run_dir={tmp_path / name}", *extra)))
        return pd.read_csv(run_dir / "metrics.csv").iloc[1:]

    dense = bytes_of("dense")
    b, t, v, k = 8, 16, 256, 3
    assert (dense.bytes_up == 3 * b * t * v * 4).all()
    # Round 1: no consensus yet, the window indices only; round 2: the consensus and both sets of indices.
    assert dense.bytes_down.tolist() == [3 * 8 * b, 3 * (b * t * v * 4 + 8 * 2 * b)]
    assert (bytes_of("topk", f"strategy.topk_logits={k}").bytes_up == 3 * b * t * k * 6).all()


def test_architectures_are_assigned_by_fraction_with_largest_remainders():
    arch = assign_architectures([0.34, 0.33, 0.33], num_clients=10, seed=0)
    assert np.bincount(arch).tolist() == [4, 3, 3]
    assert not np.array_equal(arch, assign_architectures([0.34, 0.33, 0.33], num_clients=10, seed=1))


def test_central_dp_noises_the_mean_of_clipped_predictions_and_is_accounted(compose_cfg, tmp_path):
    run_dir, summary = train.train(config.build(compose_cfg(
        *PUBLIC, "privacy=central_dp", "sampler.kind=poisson", "privacy.clip_norm=2.0",
        "privacy.noise_multiplier=1.0", "rounds=2")))
    ledger = pd.read_csv(run_dir / "privacy_ledger.csv")
    assert ledger["round"].tolist() == [1, 2] and (ledger.noise_multiplier == 1.0).all()
    assert summary["privacy"]["epsilon"] > 0
    exp = config.build(compose_cfg(*PUBLIC, "privacy=central_dp", "sampler.kind=poisson"))
    assert exp.mechanism.num_params == exp.strategy.update_size == 8 * 16 * 256


def test_resume_from_a_checkpoint_restores_every_client_model(compose_cfg, tmp_path):
    overrides = [*PUBLIC, *HETERO, "rounds=4", "checkpoint_every=2", "eval_every=1"]
    whole, _ = train.train(config.build(compose_cfg(*overrides, f"run_dir={tmp_path / 'whole'}")))
    stopped, _ = train.train(config.build(compose_cfg(*overrides, f"run_dir={tmp_path / 'stopped'}")))
    (stopped / "summary.json").unlink()  # pretend it died after round 3: back to round 2's checkpoint
    (stopped / "checkpoints" / "round_0004.pt").unlink()
    exp, rundir, checkpoint = train.load_for_resume(stopped)
    assert checkpoint["round"] == 2 and len(checkpoint["strategy"]["clients"]["weights"]) > 0
    train.resume(exp, rundir, checkpoint)
    for name in ("metrics.csv", "clients.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(whole / name).drop(columns="seconds"),
                                      pd.read_csv(stopped / name).drop(columns="seconds"), check_exact=True)


@pytest.mark.parametrize("overrides, message", [
    (["client=hetero"], "client.models: clients with different architectures need strategy=fed_distill"),
    ([*PUBLIC, "client=hetero", "client.models.0.fraction=0.5"], "client.models: the fractions sum to 1.16"),
    ([*PUBLIC, "client=hetero", "client.models.0.option=bert"], "client.models[0].option: unknown model option 'bert'"),
    ([*PUBLIC, "attack=sign_flip"], "attack: must be none with strategy=fed_distill"),
    ([*PUBLIC, "strategy.digest=during"], "strategy.digest: 'during' is not allowed; allowed: one of before, after"),
])
def test_bad_distillation_configs_are_one_clear_line(compose_cfg, overrides, message):
    with pytest.raises(FedrunError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        config.build(compose_cfg(*overrides))


def test_fed_distill_runs_from_the_command_line(play, tmp_path):
    result = CliRunner().invoke(app, ["train", "data=shakespeare", f"data.path={play}", "device=cpu",
                                      f"run_dir={tmp_path / 'cli'}", "rounds=1", "data.seq_len=16",
                                      "data.min_samples=4", "sampler.clients_per_round=2", *PUBLIC, *HETERO])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli" / "client_models.safetensors").is_file()
    result = CliRunner().invoke(app, ["generate", str(tmp_path / "cli")])
    assert result.exit_code == 2 and "is a fed_distill run: it has no global model" in result.output


def test_process_backend_gives_the_same_run_as_sequential(compose_cfg, tmp_path):
    def metrics(name, *extra):
        run_dir, _ = train.train(config.build(compose_cfg(*PUBLIC, *HETERO, "rounds=2", "sampler.clients_per_round=4",
                                                          f"run_dir={tmp_path / name}", *extra)))
        return pd.read_csv(run_dir / "metrics.csv").drop(columns="seconds")

    pd.testing.assert_frame_equal(metrics("sequential"), metrics("process", "backend=process", "backend.workers=2"))


def test_per_client_evaluation_scores_each_clients_own_model_on_its_own_test(compose_cfg, tmp_path):
    from safetensors.torch import load_file

    from fedrun.evaluation import evaluate
    from fedrun.params import flatten_parameters

    exp = config.build(compose_cfg(*PUBLIC, *HETERO, "rounds=2", "eval.per_client=true",
                                   f"run_dir={tmp_path / 'run'}"))
    run_dir, _ = train.train(exp)
    rows = pd.read_csv(run_dir / "clients_eval.csv")
    last = rows[rows["round"] == 2].set_index("client_id")
    assert (rows["model"] == "own").all() and len(last) == sum(len(c.test) > 0 for c in exp.data.clients)
    own = load_file(run_dir / "client_models.safetensors")
    models = exp.server_model
    trained = [int(k.removeprefix("client_")) for k in own if k.startswith("client_")]
    for k in trained[:3]:  # an independent evaluation of client k's saved weights, in its own architecture
        model = models.specs[models.arch_of[k]].make_model()
        flatten_parameters(model).copy_(own[f"client_{k}"])
        expected = evaluate(model, exp.data.clients[k].test, torch.device("cpu"))
        assert last.loc[k, "eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
    m = pd.read_csv(run_dir / "metrics.csv").set_index("round")
    assert m.loc[2, "eval_client_ppl_mean"] == pytest.approx(last["eval_ppl"].mean())
