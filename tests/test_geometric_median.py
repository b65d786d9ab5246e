"""strategy=geometric_median (docs/extending.md's worked example): RFA's smoothed Weiszfeld
against an independent minimiser, hand-computed cases, robustness, and a run end to end."""
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from fedrun import config, train
from fedrun.core import ClientUpdate, FedrunError
from fedrun.strategies.geometric_median import GeometricMedian, geometric_median


def _objective(v: np.ndarray, points: np.ndarray, weights: np.ndarray) -> float:
    return float(weights @ np.linalg.norm(points - v, axis=1))


def test_it_minimises_the_weighted_sum_of_distances_as_scipy_finds():
    rng = np.random.default_rng(0)
    points, weights = rng.normal(size=(7, 5)), rng.integers(1, 20, size=7).astype(float)
    ours = geometric_median(torch.tensor(points), torch.tensor(weights), iterations=500, smoothing=1e-12).numpy()
    start = weights @ points / weights.sum()
    reference = minimize(_objective, start, args=(points, weights), method="Nelder-Mead",
                         options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 100_000, "maxfev": 100_000}).x
    assert np.allclose(ours, reference, atol=1e-5)
    assert _objective(ours, points, weights) <= _objective(reference, points, weights) + 1e-9


def test_hand_computed_cases():
    line = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    # three points on a line, equal weights: the median point
    assert geometric_median(line, torch.ones(3), iterations=200, smoothing=1e-12).item() == pytest.approx(1.0, abs=1e-6)
    # two points weighted 3:1: the heavier one (moving towards the other costs 3 and gains 1 per unit)
    two = torch.tensor([[0.0, 0.0], [4.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(geometric_median(two, torch.tensor([3.0, 1.0]), iterations=200, smoothing=1e-12),
                          two[0], atol=1e-6)
    # zero iterations' starting point is the weighted mean; one iteration from it, by hand:
    # v0 = 2.75 (weights 1, 1, 2 on 0, 1, 5); beta = (1/2.75, 1/1.75, 2/2.25)/4, v1 = sum beta_i w_i / sum beta_i
    pts, w = torch.tensor([[0.0], [1.0], [5.0]], dtype=torch.float64), torch.tensor([1.0, 1.0, 2.0])
    beta = np.array([1 / 2.75, 1 / 1.75, 2 / 2.25])
    expected = float(beta @ np.array([0.0, 1.0, 5.0]) / beta.sum())
    assert geometric_median(pts, w, iterations=1, smoothing=1e-12).item() == pytest.approx(expected, rel=1e-12)


def test_a_minority_of_huge_updates_barely_moves_it():
    rng = np.random.default_rng(1)
    honest = rng.normal(1.0, 0.01, size=(9, 20))
    points = torch.tensor(np.vstack([honest, np.full((1, 20), 1e6)]), dtype=torch.float32)
    updates = [ClientUpdate(client_id=i, delta=p, num_examples=10, train_loss=0.0, seconds=0.0, bytes_up=0)
               for i, p in enumerate(points)]
    mean_error = (points.mean(0) - 1).abs().max()  # 1e5: what FedAvg would move by
    # each Weiszfeld iteration shrinks the outlier's pull: 4 (the default) cut it ~6000-fold, 8 to the noise
    assert (GeometricMedian(iterations=4, smoothing=1e-6).aggregate(updates) - 1).abs().max() < mean_error / 5000
    assert torch.allclose(GeometricMedian(iterations=8, smoothing=1e-6).aggregate(updates), torch.ones(20), atol=0.05)


SMALL = ["data=synthetic", "model=logreg", "data.num_clients=12", "data.max_client_examples=40",
         "sampler.clients_per_round=6", "client.local_steps=3", "client.batch_size=8", "rounds=3", "device=cpu"]


def test_it_runs_under_attack_and_beats_fedavg(tmp_path):
    attack = ["attack=scale", "attack.scale=100", "attack.fraction=0.2"]
    losses = {}
    for strategy in ("fedavg", "geometric_median"):
        cfg = config.compose([*SMALL, *attack, f"strategy={strategy}", f"run_dir={tmp_path / strategy}"])
        _, summary = train.train(config.build(cfg))
        losses[strategy] = summary["final"]["eval_loss"]
    assert np.isfinite(losses["geometric_median"]) and losses["geometric_median"] < losses["fedavg"]


@pytest.mark.parametrize("overrides, message", [
    (["strategy.iterations=0"], "strategy.iterations: 0 is not allowed; allowed: an integer >= 1"),
    (["strategy.smoothing=0"], "strategy.smoothing: 0.0 is not allowed; allowed: a number > 0"),
    (["privacy=central_dp", "sampler.kind=poisson"], "strategy: geometric_median cannot be combined with privacy="),
    (["privacy=secure_agg"], "strategy: geometric_median cannot be combined with privacy=secure_agg"),
])
def test_bad_values_and_combinations_are_refused_in_one_line(overrides, message):
    with pytest.raises(FedrunError, match=None) as e:
        config.compose([*SMALL, "strategy=geometric_median", *overrides])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
