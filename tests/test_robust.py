"""Robust aggregators against plain numpy oracles written independently of the torch code."""
import itertools

import numpy as np
import pytest
import torch

from fedrun.strategies.robust import coordinate_median, krum, trimmed_mean


def _t(rows) -> torch.Tensor:
    return torch.tensor(np.asarray(rows, dtype=np.float32))


def _np_trimmed_mean(x: np.ndarray, trim: float) -> np.ndarray:
    k = int(np.floor(trim * len(x)))
    return np.sort(x.astype(np.float64), axis=0)[k : len(x) - k].mean(axis=0)


def _np_krum(x: np.ndarray, f: int, multi: int) -> np.ndarray:
    """Brute force: loops over pairs, sorts distances with Python, ties to the lowest index."""
    x = x.astype(np.float64)
    n = len(x)
    scores = []
    for i in range(n):
        others = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(others[: n - f - 2]))
    order = sorted(range(n), key=lambda i: (scores[i], i))
    return x[order[:multi]].mean(axis=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 7, 10])
def test_median_matches_numpy_for_odd_and_even_k(k):
    x = np.random.default_rng(k).normal(size=(k, 13)).astype(np.float32)
    got = coordinate_median(torch.from_numpy(x))
    assert got.dtype == torch.float32 and got.shape == (13,)
    np.testing.assert_allclose(got.numpy(), np.median(x.astype(np.float64), axis=0), rtol=0, atol=1e-7)


def test_median_of_even_k_is_mean_of_the_two_middle_values_not_the_lower_one():
    # Hand-computed: column [1, 2, 10, 20] -> (2 + 10) / 2 = 6 (torch.median would say 2).
    got = coordinate_median(_t([[1.0, 0.0], [2.0, 0.0], [10.0, 1.0], [20.0, 1.0]]))
    assert got.tolist() == [6.0, 0.5]


def test_median_with_ties():
    x = np.array([[3, 1], [3, 1], [3, 5], [0, 5], [9, 1]], dtype=np.float32)
    assert coordinate_median(torch.from_numpy(x)).tolist() == np.median(x, axis=0).tolist() == [3.0, 1.0]


@pytest.mark.parametrize("k,trim", [(1, 0.0), (4, 0.1), (4, 0.25), (5, 0.2), (7, 0.3), (10, 0.49), (10, 0.0)])
def test_trimmed_mean_matches_numpy_sort_and_slice(k, trim):
    x = np.random.default_rng(100 + k).normal(size=(k, 11)).astype(np.float32)
    got = trimmed_mean(torch.from_numpy(x), trim=trim)
    assert got.dtype == torch.float32 and got.shape == (11,)
    np.testing.assert_allclose(got.numpy(), _np_trimmed_mean(x, trim), rtol=0, atol=1e-7)


def test_trimmed_mean_hand_computed_with_ties():
    # Column [5, 1, 1, 9, 1], trim 0.2 -> drop one each end of [1, 1, 1, 5, 9] -> mean(1, 1, 5) = 7/3.
    got = trimmed_mean(_t([[5.0], [1.0], [1.0], [9.0], [1.0]]), trim=0.2)
    assert got.item() == pytest.approx(7 / 3, abs=1e-6)


def test_trimmed_mean_rejects_bad_trim():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="0 <= trim < 0.5"):
        trimmed_mean(x, trim=0.5)
    with pytest.raises(ValueError, match="0 <= trim < 0.5"):
        trimmed_mean(x, trim=-0.1)


def test_trimmed_mean_always_keeps_a_value_and_rejects_empty_input():
    # floor(trim*K) <= trim*K < K/2 for trim < 0.5, so at least one value per coordinate
    # survives for every K >= 1; the K - 2k >= 1 guard can then only fire for K = 0.
    for k in range(1, 12):
        x = torch.arange(k, dtype=torch.float32).reshape(k, 1)
        got = trimmed_mean(x, trim=0.4999)
        assert got.item() == pytest.approx(_np_trimmed_mean(x.numpy(), 0.4999).item(), abs=1e-6)
    with pytest.raises(ValueError, match="K >= 1"):
        trimmed_mean(torch.zeros(0, 3), trim=0.1)


@pytest.mark.parametrize("k,f,multi", [(3, 0, 1), (5, 1, 1), (6, 1, 3), (7, 2, 1), (9, 2, 4), (10, 3, 10), (8, 0, 2)])
def test_krum_matches_numpy_brute_force(k, f, multi):
    x = np.random.default_rng(200 + k).normal(size=(k, 9)).astype(np.float32)
    got = krum(torch.from_numpy(x), num_byzantine=f, multi=multi)
    assert got.dtype == torch.float32 and got.shape == (9,)
    np.testing.assert_allclose(got.numpy(), _np_krum(x, f, multi), rtol=0, atol=1e-6)


def test_krum_single_returns_an_actual_update():
    x = np.random.default_rng(3).normal(size=(6, 5)).astype(np.float32)
    got = krum(torch.from_numpy(x), num_byzantine=1).numpy()
    assert any(np.array_equal(got, row) for row in x)


def test_krum_ties_go_to_the_lowest_index():
    # Four points on a square's corners, f=0 -> each scores the same (1 + 1 = 2 over its 2 nearest).
    square = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
    assert krum(_t(square), num_byzantine=0).tolist() == [0.0, 0.0]
    assert krum(_t(square[::-1]), num_byzantine=0).tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(krum(_t(square), num_byzantine=0, multi=2).numpy(), [0.5, 0.0])
    for perm in itertools.permutations(range(4)):
        rows = np.asarray(square, dtype=np.float32)[list(perm)]
        np.testing.assert_array_equal(krum(torch.from_numpy(rows), num_byzantine=0, multi=3).numpy(),
                                      _np_krum(rows, 0, 3).astype(np.float32))


def test_multi_krum_is_plain_mean_of_the_chosen_updates():
    # Hand-computed: 4 honest updates near [1, 1], one at [50, -50]; f=1 leaves 2 neighbours.
    honest = [[1.0, 1.0], [1.2, 1.0], [1.0, 0.8], [0.9, 1.1]]
    x = _t(honest + [[50.0, -50.0]])
    got = krum(x, num_byzantine=1, multi=4)
    np.testing.assert_allclose(got.numpy(), np.mean(honest, axis=0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_identical_updates_give_that_update_without_nan(k):
    row = np.random.default_rng(7).normal(size=8).astype(np.float32) * 1e3
    x = torch.from_numpy(np.tile(row, (k, 1)))
    outputs = [coordinate_median(x), trimmed_mean(x, trim=0.2)]
    if k >= 3:
        outputs += [krum(x, num_byzantine=(k - 3) // 2), krum(x, num_byzantine=0, multi=k)]
    for got in outputs:
        assert not torch.isnan(got).any()
        np.testing.assert_array_equal(got.numpy(), row)


def test_krum_is_precise_for_large_close_updates():
    # Updates far from the origin but close together: |a|^2 + |b|^2 - 2ab would cancel away
    # the differences; exact row differences keep them. Row 1 sits between rows 0 and 2.
    base = np.full(1000, 1e4, dtype=np.float32)
    x = np.stack([base, base + 1e-3 * 3, base + 1e-3 * 4, base + 1.0, base - 1.0])
    got = krum(torch.from_numpy(x), num_byzantine=1)
    np.testing.assert_array_equal(got.numpy(), _np_krum(x, 1, 1).astype(np.float32))
    np.testing.assert_array_equal(got.numpy(), x[1])


def test_outlier_moves_the_mean_but_not_the_robust_aggregators():
    rng = np.random.default_rng(11)
    honest = rng.normal(scale=0.1, size=(6, 4)).astype(np.float32) + 1.0
    x = np.concatenate([honest, np.full((1, 4), 1e6, dtype=np.float32)])
    t = torch.from_numpy(x)
    assert np.abs(x.mean(axis=0) - 1.0).min() > 1e4
    for got in [coordinate_median(t), trimmed_mean(t, trim=0.15), krum(t, num_byzantine=1),
                krum(t, num_byzantine=1, multi=3)]:
        assert np.abs(got.numpy() - 1.0).max() < 0.5
    np.testing.assert_allclose(coordinate_median(t).numpy(), np.median(x, axis=0), rtol=0, atol=1e-7)
    np.testing.assert_allclose(krum(t, num_byzantine=1, multi=3).numpy(), _np_krum(x, 1, 3), rtol=0, atol=1e-6)


def test_krum_rejects_too_many_byzantine():
    with pytest.raises(ValueError, match=r"K >= 2\*num_byzantine \+ 3"):
        krum(torch.zeros(4, 2), num_byzantine=1)
    with pytest.raises(ValueError, match=r"K >= 2\*num_byzantine \+ 3"):
        krum(torch.zeros(2, 2), num_byzantine=0)
    krum(torch.zeros(5, 2), num_byzantine=1)  # K = 2f + 3 is the smallest allowed


def test_krum_rejects_bad_multi_and_negative_f():
    with pytest.raises(ValueError, match="1 <= multi <= K"):
        krum(torch.zeros(5, 2), num_byzantine=1, multi=0)
    with pytest.raises(ValueError, match="1 <= multi <= K"):
        krum(torch.zeros(5, 2), num_byzantine=1, multi=6)
    with pytest.raises(ValueError, match="num_byzantine >= 0"):
        krum(torch.zeros(5, 2), num_byzantine=-1)


def test_aggregators_reject_non_stacked_input():
    for call in [coordinate_median, lambda d: trimmed_mean(d, trim=0.1), lambda d: krum(d, num_byzantine=0)]:
        with pytest.raises(ValueError, match=r"shape \(K, D\)"):
            call(torch.zeros(5))
