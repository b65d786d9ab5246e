"""Server optimizers against a straight numpy transcription of Reddi et al. 2021, Algorithm 2,
and FedAvgM (Hsu et al. 2019) against torch's SGD with momentum."""
import copy

import numpy as np
import pytest
import torch

from fedrun.strategies.server_opt import FedOpt

X0 = np.array([0.5, -1.0, 0.0, 2.0, 0.25])
# Three rounds of aggregated client deltas; zeros and sign changes exercise Yogi's sign term.
DELTAS = [
    np.array([0.1, -0.2, 0.0, 0.5, -0.05]),
    np.array([-0.3, 0.1, 0.02, 0.4, 0.0]),
    np.array([0.05, 0.05, -0.1, -0.2, 0.3]),
]
HP = dict(lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)


def _numpy_fedopt(kind: str, *, lr: float, beta1: float, beta2: float, tau: float) -> list[np.ndarray]:
    """x after each round, in float64, line by line from the paper's update rule."""
    x, m, v = X0.copy(), np.zeros_like(X0), np.full_like(X0, tau**2)
    out = []
    for d in DELTAS:
        m = beta1 * m + (1 - beta1) * d
        if kind == "adagrad":
            v = v + d**2
        elif kind == "yogi":
            v = v - (1 - beta2) * d**2 * np.sign(v - d**2)
        else:
            v = beta2 * v + (1 - beta2) * d**2
        x = x + lr * m / (np.sqrt(v) + tau)
        out.append(x.copy())
    return out


def _server_round(p: torch.nn.Parameter, opt: torch.optim.Optimizer, delta: np.ndarray) -> None:
    opt.zero_grad()
    p.grad = -torch.tensor(delta, dtype=torch.float32)
    opt.step()


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_fedopt_matches_numpy_transcription(kind):
    p = torch.nn.Parameter(torch.tensor(X0, dtype=torch.float32))
    opt = FedOpt([p], kind=kind, **HP)
    for delta, expected in zip(DELTAS, _numpy_fedopt(kind, **HP)):
        _server_round(p, opt, delta)
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-6)


def test_kinds_differ_so_the_kind_is_honoured():
    finals = [tuple(_numpy_fedopt(kind, **HP)[-1]) for kind in ["adam", "yogi", "adagrad"]]
    assert len(set(finals)) == 3
    results = []
    for kind in ["adam", "yogi", "adagrad"]:
        p = torch.nn.Parameter(torch.tensor(X0, dtype=torch.float32))
        opt = FedOpt([p], kind=kind, **HP)
        for delta in DELTAS:
            _server_round(p, opt, delta)
        results.append(p.detach().numpy().copy())
    assert not np.allclose(results[0], results[1]) and not np.allclose(results[1], results[2])


@pytest.mark.parametrize("kind", ["adam", "yogi", "adagrad"])
def test_state_dict_round_trip_mid_run_gives_identical_next_round(kind):
    p = torch.nn.Parameter(torch.tensor(X0, dtype=torch.float32))
    opt = FedOpt([p], kind=kind, **HP)
    for delta in DELTAS[:2]:
        _server_round(p, opt, delta)
    # state_dict() holds references to the live m and v, which round 3 mutates in place;
    # a checkpoint is a copy taken now, as torch.save would make.
    saved_weights, saved_state = p.detach().clone(), copy.deepcopy(opt.state_dict())
    _server_round(p, opt, DELTAS[2])

    fresh = torch.nn.Parameter(saved_weights.clone())
    resumed = FedOpt([fresh], kind=kind, **HP)
    resumed.load_state_dict(saved_state)
    _server_round(fresh, resumed, DELTAS[2])
    assert torch.equal(fresh.detach(), p.detach())
    np.testing.assert_allclose(fresh.detach().numpy(), _numpy_fedopt(kind, **HP)[2], rtol=0, atol=1e-6)


def test_state_dict_survives_torch_save_with_weights_only(tmp_path):
    p = torch.nn.Parameter(torch.tensor(X0, dtype=torch.float32))
    opt = FedOpt([p], kind="yogi", **HP)
    _server_round(p, opt, DELTAS[0])
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert torch.equal(loaded["state"][0]["v"], opt.state[p]["v"])
    assert loaded["param_groups"][0]["kind"] == "yogi"


def test_first_step_uses_v_minus_one_equal_to_tau_squared():
    # Hand-computed for adagrad, beta1=0: v_0 = tau^2 + d^2, x_1 = x_0 + lr d / (sqrt(tau^2 + d^2) + tau).
    # With d = 0.3 and tau = 0.4: sqrt(0.16 + 0.09) = 0.5, so x_1 = 0.1 * 0.3 / 0.9 = 1/30.
    p = torch.nn.Parameter(torch.zeros(1))
    opt = FedOpt([p], kind="adagrad", lr=0.1, beta1=0.0, beta2=0.0, tau=0.4)
    _server_round(p, opt, np.array([0.3]))
    assert p.item() == pytest.approx(1 / 30, abs=1e-7)


def test_parameters_without_grad_are_left_alone():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = FedOpt([a, b], kind="adam", **HP)
    a.grad = -torch.full((3,), 0.5)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(3)) and b not in opt.state
    assert (a.detach() > 1).all()


@pytest.mark.parametrize("bad,match", [
    (dict(kind="sgd"), "kind must be one of"),
    (dict(lr=0.0), "lr > 0"),
    (dict(lr=-1.0), "lr > 0"),
    (dict(beta1=1.0), "0 <= beta1 < 1"),
    (dict(beta1=-0.1), "0 <= beta1 < 1"),
    (dict(beta2=1.0), "0 <= beta2 < 1"),
    (dict(tau=0.0), "tau > 0"),
])
def test_fedopt_rejects_bad_arguments(bad, match):
    args = dict(kind="adam", **HP) | bad
    with pytest.raises(ValueError, match=match):
        FedOpt([torch.nn.Parameter(torch.zeros(2))], **args)


def test_fedavgm_is_torch_sgd_with_momentum_fed_negative_delta():
    # Hsu et al. 2019: v = mu v + delta; x = x + eta v. torch's SGD keeps buf = mu buf + g
    # (dampening 0, first buf = g) and does x -= lr buf; with g = -delta that is the same rule.
    eta, mu = 0.7, 0.9
    p = torch.nn.Parameter(torch.tensor(X0, dtype=torch.float32))
    opt = torch.optim.SGD([p], lr=eta, momentum=mu)
    x, v = X0.copy(), np.zeros_like(X0)
    for delta in DELTAS:
        v = mu * v + delta
        x = x + eta * v
        _server_round(p, opt, delta)
        np.testing.assert_allclose(p.detach().numpy(), x, rtol=0, atol=1e-6)
