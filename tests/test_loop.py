"""The round loop against independent computations."""
import pandas as pd
import torch

from fedrun import config, train
from fedrun.data.examples import concat
from fedrun.evaluation import batch_loss
from fedrun.rundir import load_checkpoint
from fedrun.server_model import initial_model


def test_one_fedavg_round_of_full_batch_gd_equals_centralised_gd_on_the_union(compose_cfg, tmp_path):
    # All clients, one local step of full-batch SGD each, example-weighted averaging:
    # sum_i (n_i/n) (w - lr g_i) = w - lr * grad of the mean loss over the union of the data.
    cfg = compose_cfg("rounds=1", "client.optimizer=sgd", "client.lr=0.5", "client.local_steps=1",
                      "client.batch_size=100000", "sampler.clients_per_round=6")
    exp = config.build(cfg)
    assert exp.data.num_clients == 6 and len({c.num_examples for c in exp.data.clients}) > 1
    run_dir, _ = train.train(exp)
    federated = load_checkpoint(run_dir / "checkpoints" / "round_0001.pt")["weights"]

    model, flat = initial_model(exp.make_model, exp.device, exp.cfg.seed)  # the same initial weights, trained centrally
    w0 = flat.detach().clone()
    x, y = concat([c.train for c in exp.data.clients]).inputs_targets(torch.device("cpu"))
    batch_loss(model, x, y).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    central = w0 - 0.5 * grad
    assert (central - w0).abs().max() > 1e-3  # the step is not negligible
    torch.testing.assert_close(federated, central, rtol=0, atol=1e-6)


def test_same_config_and_seed_give_identical_metrics(compose_cfg, tmp_path):
    tables = []
    for i in range(2):
        exp = config.build(compose_cfg("rounds=3", f"run_dir={tmp_path / str(i)}"))
        run_dir, _ = train.train(exp)
        tables.append((pd.read_csv(run_dir / "metrics.csv").drop(columns="seconds"),
                       pd.read_csv(run_dir / "clients.csv").drop(columns="seconds")))
    pd.testing.assert_frame_equal(tables[0][0], tables[1][0], check_exact=True)
    pd.testing.assert_frame_equal(tables[0][1], tables[1][1], check_exact=True)
    other = train.train(config.build(compose_cfg("rounds=3", "seed=1", f"run_dir={tmp_path / 'seed1'}")))[0]
    assert not pd.read_csv(other / "metrics.csv")["eval_loss"].equals(tables[0][0]["eval_loss"])


def test_round_rows_count_clients_examples_and_bytes(compose_cfg):
    exp = config.build(compose_cfg("rounds=2", "eval_every=2"))
    run_dir, summary = train.train(exp)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    clients = pd.read_csv(run_dir / "clients.csv")
    dim = sum(p.numel() for p in exp.make_model().parameters())
    assert metrics["round"].tolist() == [0, 1, 2]
    assert metrics.loc[0, ["clients", "examples", "bytes_up"]].tolist() == [0, 0, 0]
    assert metrics["eval_loss"].notna().tolist() == [True, False, True]
    for r in (1, 2):
        rows = clients[clients["round"] == r]
        m = metrics[metrics["round"] == r].iloc[0]
        assert m["clients"] == len(rows) == 3 and rows["client_id"].is_unique
        assert m["examples"] == rows["examples"].sum()
        assert m["bytes_up"] == m["bytes_down"] == 3 * dim * 4
        expected_loss = (rows["train_loss"] * rows["examples"]).sum() / rows["examples"].sum()
        assert abs(m["train_loss"] - expected_loss) < 1e-9
    assert summary["bytes_up"] == metrics["bytes_up"].sum()


def test_dropped_clients_are_sent_the_model_but_never_aggregated(compose_cfg):
    exp = config.build(compose_cfg("rounds=12", "eval_every=1", "sampler.dropout=0.6"))
    run_dir, _ = train.train(exp)
    metrics = pd.read_csv(run_dir / "metrics.csv").iloc[1:]
    clients = pd.read_csv(run_dir / "clients.csv")
    dim = sum(p.numel() for p in exp.make_model().parameters())
    assert (metrics["sampled"] == 3).all() and (metrics["reported"] + metrics["dropped"] == 3).all()
    assert (metrics["bytes_down"] == 3 * dim * 4).all()
    assert (metrics["bytes_up"] == metrics["reported"] * dim * 4).all()
    dropped = clients.groupby("round")["status"].apply(lambda s: (s == "dropped").sum())
    assert (dropped.values == metrics["dropped"].values).all()
    assert clients.loc[clients["status"] == "dropped", "train_loss"].isna().all()
    # A round where nobody reported keeps the global model: its eval equals the round before.
    empty = metrics.index[metrics["reported"] == 0]
    assert len(empty) > 0, "seed should give at least one empty round at dropout 0.6"
    full = pd.read_csv(run_dir / "metrics.csv")
    for i in empty:
        assert full.loc[i, "eval_loss"] == full.loc[i - 1, "eval_loss"]


def test_stragglers_draw_their_local_steps_between_min_and_max(compose_cfg):
    run_dir, _ = train.train(config.build(compose_cfg("rounds=6", "client.local_steps_min=1",
                                                      "client.local_steps_max=6")))
    steps = pd.read_csv(run_dir / "clients.csv")["local_steps"]
    assert steps.between(1, 6).all() and steps.nunique() >= 3


def test_attacked_clients_are_marked_byzantine(compose_cfg):
    exp = config.build(compose_cfg("rounds=4", "attack=sign_flip", "attack.fraction=0.5"))
    run_dir, _ = train.train(exp)
    clients = pd.read_csv(run_dir / "clients.csv")
    assert set(clients.loc[clients["status"] == "byzantine", "client_id"]) <= exp.attack.malicious
    assert set(clients.loc[clients["status"] == "ok", "client_id"]).isdisjoint(exp.attack.malicious)
    assert (clients["status"] == "byzantine").any()
