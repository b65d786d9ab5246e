"""Strategies end to end through the real local trainer, against hand computations.

The quadratic tests replace the trainer's loss by a client-specific quadratic
f_i(w) = (a_i / 2)(w - o_i)^2 so the optima are known in closed form; everything else
(flat gradients, FedProx and SCAFFOLD corrections, control variates, aggregation) is the
code under test.
"""
import io

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedrun import client as client_module
from fedrun import config, train
from fedrun.client import ClientConfig, LocalTrainer
from fedrun.core import ClientUpdate, RoundContext
from fedrun.data.examples import ClientData, Labelled
from fedrun.strategies.fedadam import FedAdam
from fedrun.strategies.fedavg import FedAvg
from fedrun.strategies.fedavgm import FedAvgM
from fedrun.strategies.fedprox import FedProx
from fedrun.strategies.scaffold import Scaffold


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))


def quadratic_loss(model, x, y):
    a, o = x[:, 0], x[:, 1]  # every example of a client holds that client's (a_i, o_i)
    return (0.5 * a * (model.w - o) ** 2).mean()


def _client(a: float, o: float, n: int = 4) -> ClientData:
    x = torch.tensor([[a, o]] * n)
    labels = torch.zeros(n, dtype=torch.long)
    return ClientData(f"a={a},o={o}", Labelled(x, labels), Labelled(x, labels))


@pytest.fixture
def quadratic(monkeypatch):
    monkeypatch.setattr(client_module, "batch_loss", quadratic_loss)

    def trainer(steps: int, lr: float, strategy=None) -> LocalTrainer:
        """The client side of `strategy`, as config.build makes it: its local rule goes to the trainer."""
        cfg = ClientConfig(optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0, batch_size=4,
                           local_epochs=None, local_steps=steps)
        return LocalTrainer(Scalar, cfg, torch.device("cpu"), local_rule=getattr(strategy, "local_rule", None))

    return trainer


def _run(strategy, trainer, clients, rounds, w0=0.0):
    weights = torch.tensor([w0])
    for r in range(1, rounds + 1):
        ctx = RoundContext(round_idx=r, seed=0, num_clients=len(clients))
        updates = [trainer.train(strategy.client_job(i), c, weights, ctx) for i, c in enumerate(clients)]
        if (client_state := getattr(strategy, "client_state", None)) is not None:  # SCAFFOLD's c_i, kept client-side
            updates = [client_state.on_client(u, ctx) for u in updates]
        weights = strategy.apply(weights, strategy.aggregate(updates))
    return float(weights)


def test_fedprox_adds_mu_times_distance_to_global_to_every_local_gradient(quadratic):
    a, o, mu, lr, w0 = 2.0, 3.0, 0.5, 0.1, 1.0
    fedprox = FedProx(mu=mu)
    update = quadratic(steps=3, lr=lr, strategy=fedprox).train(fedprox.client_job(0), _client(a, o),
                                                               torch.tensor([w0]), RoundContext(1, 0, 1))
    w = w0
    for _ in range(3):  # hand-computed: grad = a (w - o) + mu (w - w0)
        w = w - lr * (a * (w - o) + mu * (w - w0))
    assert float(update.delta) == pytest.approx(w - w0, abs=1e-6)


def test_local_rules_act_on_the_active_rows_of_a_stack_as_on_each_client_alone():
    """The vectorized backend's (K, D) stack, rows [:active], against one client at a time."""
    g = torch.Generator().manual_seed(0)
    weights, rows, grads = torch.randn(5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    control = torch.randn(5, generator=g)
    own = {1: torch.randn(5, generator=g)}  # client 0 has no c_i yet (its first round), client 1 has one
    for strategy in (FedProx(mu=0.3), Scaffold(server_lr=1.0, num_clients=3, num_params=5, device=torch.device("cpu"))):
        if isinstance(strategy, Scaffold):
            strategy.control, strategy.client_controls = control, dict(own)
        jobs = [strategy.client_job(c) for c in range(3)]
        rule = strategy.local_rule
        stacked = grads.clone()
        rule.gradient_term(jobs, weights)(stacked[:2], rows[:2])
        for k in range(2):
            alone = grads[k : k + 1].clone()
            rule.gradient_term([jobs[k]], weights)(alone, rows[k : k + 1])
            assert torch.equal(stacked[k], alone[0])
        assert torch.equal(stacked[2], grads[2])  # a finished row is not touched
    expected = grads[1] + control - own[1]  # SCAFFOLD: c - c_i
    torch.testing.assert_close(stacked[1], expected)
    torch.testing.assert_close(stacked[0], grads[0] + control)


def test_what_scaffold_sends_down_is_counted_and_what_the_client_keeps_is_not():
    s = Scaffold(server_lr=1.0, num_clients=2, num_params=7, device=torch.device("cpu"))
    s.client_controls[0] = torch.ones(7)
    job = s.client_job(0)
    assert torch.equal(job.state["control"], torch.ones(7)) and job.extra_bytes == 7 * 4
    assert FedProx(mu=0.1).client_job(0).extra_bytes == FedAvg().client_job(0).extra_bytes == 0
    delta = torch.full((7,), 0.5)
    sent = s.local_rule.client_extras(job, delta, steps=5, lr=0.1)  # -c - delta / (K lr), c = 0
    torch.testing.assert_close(sent["control_delta"], -delta / 0.5)
    assert FedProx(mu=0.1).local_rule.client_extras(job, delta, steps=5, lr=0.1) == {}


def test_scaffold_reaches_the_global_optimum_where_fedavg_drifts(quadratic):
    # Opposite optima, different curvatures: the global optimum of f1 + f2 is
    # (a1 o1 + a2 o2) / (a1 + a2) = (1 - 3) / 4 = -0.5. With 50 local steps each client nearly
    # reaches its own optimum, so FedAvg settles near the mean of the optima, 0.
    clients = [_client(1.0, 1.0), _client(3.0, -1.0)]
    optimum = -0.5
    fedavg = _run(FedAvg(), quadratic(50, 0.1), clients, rounds=50)
    scaffold = Scaffold(server_lr=1.0, num_clients=2, num_params=1, device=torch.device("cpu"))
    scaffold = _run(scaffold, quadratic(50, 0.1, scaffold), clients, rounds=50)
    assert abs(fedavg - optimum) > 0.4
    assert abs(scaffold - optimum) < 1e-3


def test_scaffold_resumed_from_its_checkpoint_continues_exactly(quadratic):
    clients = [_client(1.0, 1.0), _client(3.0, -1.0)]
    def make() -> Scaffold:
        return Scaffold(server_lr=1.0, num_clients=2, num_params=1, device=torch.device("cpu"))

    first = make()
    trainer = quadratic(5, 0.1, first)
    w = _run(first, trainer, clients, rounds=3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second = make()
    second.load_state_dict(torch.load(buffer, weights_only=True))
    assert _run(first, trainer, clients, rounds=2, w0=w) == _run(second, trainer, clients, rounds=2, w0=w)


def _updates(deltas, sizes):
    return [ClientUpdate(client_id=i, delta=torch.tensor(d, dtype=torch.float32), num_examples=n,
                         train_loss=0.0, seconds=0.0, bytes_up=0) for i, (d, n) in enumerate(zip(deltas, sizes))]


def test_fedavg_server_step_is_exactly_w_plus_weighted_delta():
    s = FedAvg()
    w = torch.tensor([0.1, -0.3, 7.0])
    ups = _updates([[1.0, 2.0, 3.0], [0.5, 0.25, -1.0]], [1, 3])
    expected = w + (1 * ups[0].delta + 3 * ups[1].delta) / 4
    assert torch.equal(s.apply(w, s.aggregate(ups)), expected)


def test_fedavgm_and_fedadam_strategies_follow_their_papers_over_three_rounds():
    rng = np.random.default_rng(1)
    rounds = [rng.normal(size=(2, 4)).astype(np.float32) for _ in range(3)]
    sizes = [2, 6]
    mom, adam = FedAvgM(server_lr=0.5, momentum=0.9), FedAdam(server_lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w_mom = w_adam = torch.zeros(4)
    x_mom, v_mom = np.zeros(4), np.zeros(4)
    x_adam, m, v = np.zeros(4), np.zeros(4), np.full(4, 1e-6)
    for deltas in rounds:
        w_mom = mom.apply(w_mom, mom.aggregate(_updates(deltas, sizes)))
        w_adam = adam.apply(w_adam, adam.aggregate(_updates(deltas, sizes)))
        d = (2 * deltas[0].astype(np.float64) + 6 * deltas[1]) / 8
        v_mom = 0.9 * v_mom + d  # Hsu et al. 2019
        x_mom = x_mom + 0.5 * v_mom
        m = 0.9 * m + 0.1 * d  # Reddi et al. 2021, Algorithm 2 (FedAdam)
        v = 0.99 * v + 0.01 * d**2
        x_adam = x_adam + 0.1 * m / (np.sqrt(v) + 1e-3)
    np.testing.assert_allclose(w_mom.numpy(), x_mom, atol=1e-6)
    np.testing.assert_allclose(w_adam.numpy(), x_adam, atol=1e-5)


def test_fedprox_with_mu_zero_equals_fedavg_exactly(compose_cfg, tmp_path):
    runs = []
    for name, strategy in [("avg", ["strategy=fedavg"]), ("prox", ["strategy=fedprox", "strategy.mu=0"])]:
        run_dir, _ = train.train(config.build(compose_cfg(*strategy, "rounds=2", f"run_dir={tmp_path / name}")))
        runs.append(pd.read_csv(run_dir / "metrics.csv").drop(columns="seconds"))
    pd.testing.assert_frame_equal(runs[0], runs[1], check_exact=True)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox", "scaffold",
                                  "median", "trimmed_mean", "krum"])
def test_every_strategy_trains_through_the_cli_path_and_checkpoints_its_state(name, compose_cfg, tmp_path):
    extra = {"scaffold": ["client.optimizer=sgd", "client.lr=0.5"],
             "krum": ["strategy.num_byzantine=1", "sampler.clients_per_round=5"]}.get(name, [])
    exp = config.build(compose_cfg(f"strategy={name}", "rounds=3", *extra))
    run_dir, summary = train.train(exp)
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["eval_loss"].iloc[-1] < metrics["eval_loss"].iloc[0]
    state = torch.load(run_dir / "checkpoints" / "round_0003.pt", weights_only=True)["strategy"]
    if name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert state["optimizer"]["state"], "server optimizer state must be checkpointed"
    if name == "scaffold":
        assert state["control"].abs().sum() > 0 and len(state["client_controls"]) >= 3


def test_capabilities_are_declared_where_the_rules_between_components_read_them():
    from fedrun.components import capability

    def caps(option: str) -> tuple:
        node = config.compose([f"strategy={option}"], check_ranges=False).strategy
        return tuple(capability(node, "strategy", name) for name in
                     ("needs_individual_updates", "secure_sum_weighting", "client_sends_extras", "needs_plain_sgd",
                      "exchanges"))

    for option in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox"):
        assert caps(option) == (False, "examples", False, False, "weights"), option
    for option in ("median", "trimmed_mean", "krum", "feddf"):
        assert caps(option) == (True, None, False, False, "weights"), option
    assert caps("scaffold") == (False, "uniform", True, True, "weights")
    assert caps("fed_distill") == (False, None, False, False, "logits")
    assert Scaffold.secure_sum_extras == ("control_delta",)
