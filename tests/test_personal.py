"""Per-client evaluation (eval.per_client) and the local-training baseline (strategy=local):
each client scored on its own test split, checked against hand evaluations of the saved
weights; a local client's weights against a hand-written SGD loop over the same batches."""
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from fedrun import config, train
from fedrun.client import batch_indices
from fedrun.core import FedrunError, Stream, torch_generator
from fedrun.evaluation import evaluate
from fedrun.models.small import LogReg
from fedrun.params import flatten_parameters

SYNTH = ["data=synthetic", "data.num_clients=6", "data.max_client_examples=60", "model=logreg", "device=cpu",
         "client.optimizer=sgd", "client.lr=0.1", "client.local_steps=4", "client.batch_size=8",
         "sampler.clients_per_round=3", "rounds=4", "eval_every=2", "data.cache=false"]


def _run(tmp_path, *overrides, name="run"):
    exp = config.build(config.compose([*SYNTH, f"run_dir={tmp_path / name}", *overrides]))
    run_dir, summary = train.train(exp)
    return exp, run_dir


def _model(exp, flat: torch.Tensor) -> torch.nn.Module:
    model = exp.make_model()
    flatten_parameters(model).copy_(flat)
    return model


def test_per_client_rows_are_each_clients_test_split_under_the_global_model(tmp_path):
    exp, run_dir = _run(tmp_path, "eval.per_client=true")
    rows = pd.read_csv(run_dir / "clients_eval.csv")
    assert sorted(rows["round"].unique()) == [0, 2, 4]
    assert (rows.groupby("round").size() == 6).all() and (rows["model"] == "global").all()
    final = load_file(run_dir / "model.safetensors")
    model = exp.make_model()
    model.load_state_dict(final)
    last = rows[rows["round"] == 4].set_index("client_id")
    for k in range(6):  # an independent evaluation of the saved model on client k's own test split
        expected = evaluate(model, exp.data.clients[k].test, torch.device("cpu"))
        assert last.loc[k, "eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-9)
        assert last.loc[k, "test_examples"] == len(exp.data.clients[k].test)
    metrics = pd.read_csv(run_dir / "metrics.csv").set_index("round")
    ppl = last["eval_ppl"].to_numpy()
    assert metrics.loc[4, "eval_client_ppl_mean"] == pytest.approx(ppl.mean())
    assert metrics.loc[4, "eval_client_ppl_p10"] == pytest.approx(np.percentile(ppl, 10))
    assert metrics.loc[4, "eval_client_ppl_p90"] == pytest.approx(np.percentile(ppl, 90))
    assert metrics.loc[4, "eval_client_ppl_p10"] <= metrics.loc[4, "eval_client_ppl_mean"] \
        <= metrics.loc[4, "eval_client_ppl_p90"]
    assert np.isnan(metrics.loc[1, "eval_client_ppl_mean"])  # not an evaluation round


def test_eval_clients_is_a_fixed_seeded_sample(tmp_path):
    _, run_dir = _run(tmp_path, "eval.per_client=true", "eval.clients=2")
    rows = pd.read_csv(run_dir / "clients_eval.csv")
    chosen = [tuple(sorted(g["client_id"])) for _, g in rows.groupby("round")]
    assert len(chosen) == 3 and len(set(chosen)) == 1 and len(chosen[0]) == 2  # the same 2 every evaluation
    with pytest.raises(FedrunError, match="eval.clients: .*eval.per_client"):
        config.compose([*SYNTH, "eval.clients=2"])


def test_a_local_client_trains_alone_as_a_hand_written_sgd_loop(tmp_path):
    exp, run_dir = _run(tmp_path, "strategy=local", "sampler.clients_per_round=6", "eval.per_client=true")
    own = load_file(run_dir / "client_models.safetensors")
    assert sorted(own) == [f"client_{k}" for k in range(6)]
    initial = flatten_parameters(_initial(exp)).detach().clone()
    for k in (0, 4):  # every round, continue from its own weights on its own batches; plain SGD, no averaging
        model = LogReg(num_features=60, num_classes=10)
        flatten_parameters(model).copy_(initial)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_split = exp.data.clients[k].train
        for round_idx in range(1, 5):
            order = torch_generator(exp.cfg.seed, Stream.CLIENT, round_idx, k)
            for idx in batch_indices(len(train_split), 8, 4, order):
                x, y = train_split[idx].inputs_targets(torch.device("cpu"))
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        torch.testing.assert_close(own[f"client_{k}"], flatten_parameters(model).detach(), rtol=1e-5, atol=1e-6)
    metrics = pd.read_csv(run_dir / "metrics.csv").set_index("round")
    assert (metrics.loc[1:, "bytes_up"] == 0).all() and (metrics.loc[1:, "bytes_down"] == 0).all()
    global_model = load_file(run_dir / "model.safetensors")  # never averaged: still the initial model
    torch.testing.assert_close(torch.cat([v.flatten() for v in global_model.values()]).sum(), initial.sum())
    # The run's eval metrics: every client's test examples scored by that client's own model.
    sums = [evaluate(_model(exp, own[f"client_{k}"]), exp.data.clients[k].test, torch.device("cpu"))
            for k in range(6)]
    sizes = [len(exp.data.clients[k].test) for k in range(6)]
    pooled = sum(s["eval_loss"] * n for s, n in zip(sums, sizes)) / sum(sizes)
    assert metrics.loc[4, "eval_loss"] == pytest.approx(pooled, rel=1e-9)
    rows = pd.read_csv(run_dir / "clients_eval.csv")
    assert (rows["model"] == "own").all()


def _initial(exp) -> torch.nn.Module:
    from fedrun.server_model import initial_model

    return initial_model(exp.make_model, torch.device("cpu"), exp.cfg.seed)[0]


def test_local_on_the_vectorized_backend_equals_sequential(tmp_path):
    _, seq = _run(tmp_path, "strategy=local", name="seq")
    _, vec = _run(tmp_path, "strategy=local", "backend=vectorized", name="vec")
    a, b = load_file(seq / "client_models.safetensors"), load_file(vec / "client_models.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_a_resumed_local_run_ends_as_an_uninterrupted_one(tmp_path):
    import shutil

    _, whole = _run(tmp_path, "strategy=local", "checkpoint_every=2", "eval.per_client=true", name="whole")
    stopped = tmp_path / "stopped"  # as if killed during round 4: its files a prefix, its newest checkpoint round 2
    shutil.copytree(whole, stopped)
    for name in ("summary.json", "client_models.safetensors", "checkpoints/round_0004.pt",
                 "checkpoints/round_0004.sha256"):
        (stopped / name).unlink()
    train.resume(*train.load_for_resume(stopped))
    for name in ("metrics.csv", "clients_eval.csv", "clients.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(stopped / name).drop(columns="seconds", errors="ignore"),
                                      pd.read_csv(whole / name).drop(columns="seconds", errors="ignore"))
    a, b = load_file(whole / "client_models.safetensors"), load_file(stopped / "client_models.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, message", [
    ("privacy=central_dp", "privacy: strategy=local sends nothing to protect"),
    ("compression=topk", "compression: must be none with strategy=local"),
])
def test_local_refuses_what_acts_on_what_is_sent(override, message):
    with pytest.raises(FedrunError, match=message):
        config.compose([*SYNTH, "strategy=local", override, "sampler.kind=poisson"])


def test_local_has_no_global_model_to_answer_with(compose_cfg):
    with pytest.raises(FedrunError, match="eval.choices: strategy=local has no global model"):
        compose_cfg("strategy=local", "eval.choices=questions.jsonl")


def test_report_shows_the_client_ppl_spread(tmp_path):
    from typer.testing import CliRunner

    from fedrun.cli import app

    _, run_dir = _run(tmp_path, "eval.per_client=true", "rounds=2", name="runs/a")
    out = CliRunner().invoke(app, ["report", str(tmp_path / "runs")], env={"COLUMNS": "250"})
    assert out.exit_code == 0, out.output
    assert "client ppl" in out.output and "client p90" in out.output
    p90 = pd.read_csv(run_dir / "metrics.csv")["eval_client_ppl_p90"].dropna().iloc[-1]
    assert f"{p90:.4g}" in out.output


# ---- strategy=centralized: one model on the pooled training data --------------------------------

def test_centralized_is_a_hand_written_sgd_loop_on_the_pooled_data(tmp_path):
    exp, run_dir = _run(tmp_path, "strategy=centralized")
    # The pooled data: every client's training examples, client after client.
    x_all = torch.cat([exp.data.clients[k].train.features for k in range(6)])
    y_all = torch.cat([exp.data.clients[k].train.labels for k in range(6)])
    model = _initial(exp)
    for round_idx in range(1, 5):  # 3 clients x 4 local steps a round, batches from the pooled stream (id N = 6)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for idx in batch_indices(len(x_all), 8, 12, torch_generator(exp.cfg.seed, Stream.CLIENT, round_idx, 6)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x_all[idx]), y_all[idx]).backward()
            optimizer.step()
    saved = exp.make_model()
    saved.load_state_dict(load_file(run_dir / "model.safetensors"))
    torch.testing.assert_close(flatten_parameters(saved), flatten_parameters(model).detach(), rtol=1e-5, atol=1e-6)
    clients = pd.read_csv(run_dir / "clients.csv")
    assert clients["client_id"].tolist() == [6] * 4 and clients["local_steps"].tolist() == [12] * 4
    assert (clients["examples"] == len(x_all)).all()
    metrics = pd.read_csv(run_dir / "metrics.csv").set_index("round")
    assert (metrics.loc[1:, "bytes_up"] == 0).all() and (metrics.loc[1:, "bytes_down"] == 0).all()


def test_centralized_takes_the_steps_the_cohort_would_take(tmp_path):
    epochs = ["client.local_steps=null", "client.local_epochs=1", "client.optimizer=sgd"]
    _, fed = _run(tmp_path, *epochs, name="fed")
    _, central = _run(tmp_path, *epochs, "strategy=centralized", name="central")
    per_round = pd.read_csv(fed / "clients.csv").groupby("round")["local_steps"].sum()
    assert pd.read_csv(central / "clients.csv").set_index("round")["local_steps"].equals(per_round)


@pytest.mark.parametrize("override, message", [
    ("privacy=local_dp", "privacy: strategy=centralized trains one model on the pooled data"),
    ("backend=vectorized", "backend: strategy=centralized trains one model in the main process"),
    ("attack=sign_flip", "attack: must be none with strategy=centralized"),
])
def test_centralized_refuses_what_needs_clients(override, message):
    with pytest.raises(FedrunError, match=message):
        config.compose([*SYNTH, "strategy=centralized", override])


# ---- model.lora.aggregation=fedsa: A averaged, B kept by each client ------------------------------

HF = ["model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1", "model.lora.r=2",
      "model.lora.aggregation=fedsa", "rounds=3", "data.seq_len=16", "data.min_samples=4",
      "sampler.clients_per_round=3", "eval_every=1", "eval.per_client=true", "checkpoint_every=1"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fedsa_keeps_b_on_the_clients_and_sends_only_a(compose_cfg, tmp_path):
    pytest.importorskip("peft", reason="model=hf's LoRA needs the [llm] extra: pip install -e .[llm]")
    exp = config.build(compose_cfg(*HF, f"run_dir={tmp_path / 'fedsa'}", tiny=False))
    method = exp.lora
    a_size = 1 * 2 * 16  # A of GPT-2's c_attn: r x n_embd, one layer
    assert method.shared == a_size and len(method.b_index) == 1 * 3 * 16 * 2
    run_dir, _ = train.train(exp)
    m = pd.read_csv(run_dir / "metrics.csv").set_index("round")
    assert (m.loc[1:, "bytes_up"] == m.loc[1:, "reported"] * a_size * 4).all()  # B never leaves a client
    assert (m.loc[1:, "bytes_down"] == m.loc[1:, "sampled"] * a_size * 4).all()
    assert (m.loc[1:, "lora_agg_error"] > 0).all()  # a client's B next to the mean A is not its own B A
    own = load_file(run_dir / "client_lora_b.safetensors")
    trained = [k for k in own if k.startswith("client_")]
    assert trained and all(own[k].abs().sum() > 0 for k in trained)
    assert len({tuple(own[k].tolist()) for k in trained}) == len(trained)  # each client's own B
    # Each client is scored with the global A and its own B: an independent evaluation of that model.
    rows = pd.read_csv(run_dir / "clients_eval.csv")
    last = rows[rows["round"] == 3].set_index("client_id")
    model = exp.make_model()
    flat = flatten_parameters(model)
    flat.copy_(exp.server_model.flat)  # the final global weights (A averaged; B as initialised)
    for key in trained[:2]:
        k = int(key.removeprefix("client_"))
        with torch.no_grad():
            flat[own["b_index"]] = own[key]
        expected = evaluate(model, exp.data.clients[k].test, torch.device("cpu"))
        assert last.loc[k, "eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
        assert last.loc[k, "model"] == "own"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_fedsa_client_state_survives_resume(compose_cfg, tmp_path):
    import shutil

    pytest.importorskip("peft", reason="model=hf's LoRA needs the [llm] extra: pip install -e .[llm]")
    whole, _ = train.train(config.build(compose_cfg(*HF, f"run_dir={tmp_path / 'whole'}", tiny=False)))
    stopped = tmp_path / "stopped"  # killed during round 3: the newest checkpoint is round 2's
    shutil.copytree(whole, stopped)
    for name in ("summary.json", "client_lora_b.safetensors", "checkpoints/round_0003.pt",
                 "checkpoints/round_0003.sha256"):
        (stopped / name).unlink()
    train.resume(*train.load_for_resume(stopped))
    for name in ("metrics.csv", "clients_eval.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(stopped / name).drop(columns="seconds", errors="ignore"),
                                      pd.read_csv(whole / name).drop(columns="seconds", errors="ignore"))
    a, b = load_file(whole / "client_lora_b.safetensors"), load_file(stopped / "client_lora_b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.enabled=false"], "model.lora.aggregation: fedsa combines LoRA factors"),
    (["strategy=scaffold", "client.optimizer=sgd"], "fedsa keeps each client's B"),
    (["strategy=local"], "fedsa keeps each client's B"),
])
def test_fedsa_refusals(compose_cfg, overrides, message):
    with pytest.raises(FedrunError, match=message):
        compose_cfg("model=hf", "model.lora.aggregation=fedsa", *overrides, tiny=False)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("strategy, measured", [("fedavg", True), ("local", False), ("centralized", False)])
def test_lora_agg_error_is_measured_only_where_updates_are_averaged(compose_cfg, strategy, measured):
    pytest.importorskip("peft", reason="model=hf's LoRA needs the [llm] extra: pip install -e .[llm]")
    exp = config.build(compose_cfg("model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1",
                                   "data.seq_len=16", "data.min_samples=4", "sampler.clients_per_round=3",
                                   f"strategy={strategy}", tiny=False))
    assert ("lora_agg_error" in exp.server_model.metric_columns) == measured
