"""backend=vectorized: the cohort trained as one batch gives sequential training's updates.

The oracle is backend=sequential (one LocalTrainer on the plain model) on the same jobs,
weights and round; the flat optimizers are checked against torch.optim in test_flat_optim.py.
"""
import logging

import pandas as pd
import pytest
import torch
from torch import nn

from fedrun import config, train
from fedrun.backends.vectorized import VectorizedBackend
from fedrun.client import ClientConfig, LocalTrainer
from fedrun.core import ClientJob, RoundContext
from fedrun.params import flatten_parameters

FALLBACK = "backend=vectorized: training clients sequentially"
GPT_SGD = ["client.optimizer=sgd", "client.lr=0.5", "client.momentum=0.9", "client.weight_decay=0.01"]


@pytest.fixture
def synthetic_cfg(tmp_path):
    """compose_cfg's counterpart for data=synthetic (8 clients of different sizes)."""

    def _compose(*overrides: str):
        model = [] if any(o.startswith("model=") for o in overrides) else ["model=logreg"]
        return config.compose([f"run_dir={tmp_path / 'run'}", "device=cpu", "data=synthetic", "data.num_clients=8",
                               "sampler.clients_per_round=8", "rounds=2", "eval_every=1", *model, *overrides])

    return _compose


def _round(cfg, *, jobs=None, round_idx=1):
    """The updates of one round of every client, from cfg's backend and the seeded initial model."""
    exp = config.build(cfg)
    torch.manual_seed(0)
    weights = flatten_parameters(exp.make_model()).detach().clone()
    ctx = RoundContext(round_idx=round_idx, seed=cfg.seed, num_clients=exp.data.num_clients)
    cohort = jobs(exp, weights) if jobs else [exp.strategy.client_job(c) for c in range(exp.data.num_clients)]
    return exp.backend.train_cohort(weights, cohort, ctx)


def _both(compose, *overrides, vectorized=(), **kwargs):
    seq = _round(compose("backend=sequential", *overrides), **kwargs)
    vec = _round(compose("backend=vectorized", *vectorized, *overrides), **kwargs)
    return seq, vec


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def assert_same_updates(seq, vec, *, rtol=1e-5):
    assert [u.client_id for u in vec] == [u.client_id for u in seq]
    for s, v in zip(seq, vec):
        assert (v.num_examples, v.num_steps, v.bytes_up) == (s.num_examples, s.num_steps, s.bytes_up)
        assert torch.linalg.vector_norm(s.delta) > 0
        assert _relative(v.delta, s.delta) < rtol, s.client_id
        assert v.train_loss == pytest.approx(s.train_loss, rel=rtol)
        assert v.extras.keys() == s.extras.keys()
        for key in s.extras:
            assert _relative(v.extras[key], s.extras[key]) < rtol


def test_tiny_gpt_sgd_with_momentum_and_weight_decay(compose_cfg):
    seq, vec = _both(compose_cfg, *GPT_SGD)
    assert_same_updates(seq, vec)


def test_tiny_gpt_adam_with_weight_decay(compose_cfg):
    # Adam divides by sqrt(v): a gradient's last-bit rounding (batched vs single matmuls)
    # moves its update more than SGD's, hence 1e-4 rather than 1e-5.
    seq, vec = _both(compose_cfg, "client.optimizer=adam", "client.lr=0.003", "client.weight_decay=0.01")
    assert_same_updates(seq, vec, rtol=1e-4)


@pytest.mark.parametrize("model, optimizer", [
    ("logreg", ["client.optimizer=sgd", "client.lr=0.1", "client.momentum=0.5"]),
    ("mlp", ["client.optimizer=adam", "client.lr=0.01"])])
def test_small_models_with_local_epochs_of_ragged_clients(synthetic_cfg, monkeypatch, model, optimizer):
    alone = []  # the steps from which the longest client finished alone, on the plain model
    finish_alone = VectorizedBackend.finish_alone
    monkeypatch.setattr(VectorizedBackend, "finish_alone",
                        lambda self, *args, **kwargs: alone.append(args[3]) or finish_alone(self, *args, **kwargs))
    seq, vec = _both(synthetic_cfg, f"model={model}", "client.local_steps=null", "client.local_epochs=2",
                     "client.batch_size=8", *optimizer)
    sizes = [u.num_examples for u in seq]
    assert len(set(sizes)) > 1 and any(n % 8 for n in sizes)  # different sizes, short last batches
    steps = sorted(u.num_steps for u in seq)
    assert steps[-1] > steps[-2] and alone == [steps[-2]]  # it trained alone after the runner-up stopped
    assert_same_updates(seq, vec, rtol=1e-4 if "adam" in optimizer[0] else 1e-5)


def test_stragglers_stop_after_their_own_steps_in_groups_of_max_clients(compose_cfg):
    stragglers = ["client.local_steps_min=1", "client.local_steps_max=8", *GPT_SGD]
    seq, vec = _both(compose_cfg, *stragglers)
    assert len({u.num_steps for u in seq}) > 2
    assert_same_updates(seq, vec)
    _, grouped = _both(compose_cfg, *stragglers, vectorized=["backend.max_clients=4"])
    assert_same_updates(seq, grouped)


def test_a_client_with_fewer_examples_than_the_batch_size(compose_cfg):
    seq, vec = _both(compose_cfg, "client.batch_size=32", *GPT_SGD)
    assert any(u.num_examples < 32 for u in seq) and any(u.num_examples > 32 for u in seq)
    assert_same_updates(seq, vec)


def test_fedprox_adds_each_clients_proximal_gradient(compose_cfg):
    seq, vec = _both(compose_cfg, "strategy=fedprox", "strategy.mu=0.5", *GPT_SGD)
    assert_same_updates(seq, vec)


def test_scaffold_corrections_and_control_deltas(compose_cfg):
    def jobs(exp, weights):
        g = torch.Generator().manual_seed(1)
        control = 0.01 * torch.randn(weights.shape, generator=g)
        # Clients 0 and 3 have no c_i yet (their first round); the others have their own.
        return [ClientJob(c, payload={"control": control}, state={} if c in (0, 3) else {"control": 0.01 * torch.randn(
            weights.shape, generator=g)}) for c in range(exp.data.num_clients)]

    seq, vec = _both(compose_cfg, "strategy=scaffold", "client.optimizer=sgd", "client.lr=0.5", jobs=jobs)
    assert all("control_delta" in u.extras for u in seq)
    assert_same_updates(seq, vec)


@pytest.mark.parametrize("overrides", [[], ["strategy=scaffold", "client.optimizer=sgd", "compression=topk"]])
def test_end_to_end_runs_write_the_same_tables_as_sequential(compose_cfg, tmp_path, overrides):
    tables = []
    for backend in ("sequential", "vectorized"):
        exp = config.build(compose_cfg("rounds=3", f"backend={backend}", f"run_dir={tmp_path / backend}", *overrides))
        run_dir, _ = train.train(exp)
        tables.append([pd.read_csv(run_dir / name).drop(columns="seconds") for name in ("metrics.csv", "clients.csv")])
    for seq, vec in zip(*tables):
        assert list(seq.columns) == list(vec.columns) and len(seq) == len(vec)
        pd.testing.assert_frame_equal(seq, vec, check_exact=False, rtol=1e-4)


def _records(caplog):
    return [r for r in caplog.records if FALLBACK in r.getMessage()]


@pytest.mark.parametrize("overrides, reason", [(["model.dropout=0.1"], "dropout 0.1"),
                                               (["privacy=local_dp"], "DP-SGD")])
def test_dropout_or_example_dp_falls_back_to_sequential_with_one_log_line(compose_cfg, caplog, overrides, reason):
    with caplog.at_level(logging.INFO):
        seq, vec = _both(compose_cfg, *overrides)
    assert len(_records(caplog)) == 1 and reason in _records(caplog)[0].getMessage()
    for s, v in zip(seq, vec):
        assert torch.equal(s.delta, v.delta) and s.train_loss == v.train_loss and s.num_steps == v.num_steps


def test_a_recurrent_layer_falls_back_when_built_without_trying_vmap(compose_cfg, caplog):
    """On CUDA vmap runs cuDNN's LSTM without an error and trains wrongly (seen on an H100:
    eval loss 5.33 against sequential's 3.32), so the module type decides, on every device."""
    lstm = ["model=lstm", "model.hidden_size=16", "model.num_layers=1", "data.seq_len=16", "data.min_samples=4",
            "sampler.clients_per_round=3"]
    with caplog.at_level(logging.INFO):
        backend = config.build(compose_cfg("backend=vectorized", *lstm, tiny=False)).backend
    assert len(_records(caplog)) == 1 and "fused recurrent layer LSTM" in _records(caplog)[0].getMessage()
    assert not hasattr(backend, "stacked")  # decided before anything was stacked or vmapped
    seq, vec = _both(lambda *o: compose_cfg(*o, tiny=False), *lstm)
    for s, v in zip(seq, vec):
        assert torch.equal(s.delta, v.delta) and s.train_loss == v.train_loss


class Branchy(nn.Module):
    """Python control flow on a tensor's value: vmap cannot batch it."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if out.sum() > 0 else -out


class TracedTrainer(LocalTrainer):
    """Any trainer but a plain LocalTrainer may train differently: the backend must not batch it."""


@pytest.mark.parametrize("trainer_class, reason", [(LocalTrainer, "vmap cannot batch"),
                                                   (TracedTrainer, "not a plain LocalTrainer")])
def test_a_model_or_trainer_it_cannot_batch_falls_back_once_with_the_reason(synthetic_cfg, caplog, trainer_class,
                                                                            reason):
    exp = config.build(synthetic_cfg())
    cfg = ClientConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=8, local_epochs=None,
                       local_steps=3)

    def make_trainer(cls):
        torch.manual_seed(0)
        return cls(lambda: Branchy(60, 10), cfg, torch.device("cpu"))

    backend = VectorizedBackend(make_trainer=lambda: make_trainer(trainer_class), data=exp.data, client_hooks=[],
                                max_clients=None)
    oracle = make_trainer(LocalTrainer)
    weights = oracle.flat.detach().clone()
    with caplog.at_level(logging.INFO):
        for round_idx in (1, 2):
            ctx = RoundContext(round_idx=round_idx, seed=0, num_clients=exp.data.num_clients)
            updates = backend.train_cohort(weights, [ClientJob(c) for c in range(6)], ctx)  # vmap runs from 4
            for u in updates:
                expected = oracle.train(ClientJob(u.client_id), exp.data.clients[u.client_id], weights, ctx)
                assert torch.equal(u.delta, expected.delta)
    assert len(_records(caplog)) == 1 and reason in _records(caplog)[0].getMessage()


def test_max_clients_must_be_positive(synthetic_cfg):
    with pytest.raises(Exception, match="backend.max_clients: 0 is not allowed"):
        config.build(synthetic_cfg("backend=vectorized", "backend.max_clients=0"))
