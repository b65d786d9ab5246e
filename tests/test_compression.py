"""Compression hooks against numpy oracles: top-k selection, error feedback, unbiased
stochastic quantisation, bytes on the wire, and exact resume from state_dict."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from fedrun.compression import NoCompression, StochasticQuantizer, TopK
from fedrun.core import ClientUpdate, FedrunError, RoundContext


def make_update(delta: np.ndarray, client_id: int = 0, extra_bytes: int = 0) -> ClientUpdate:
    d = torch.as_tensor(delta, dtype=torch.float32)
    return ClientUpdate(client_id=client_id, delta=d, num_examples=10, train_loss=0.0, seconds=0.0,
                        bytes_up=4 * d.numel() + extra_bytes)


def ctx(round_idx: int = 1, seed: int = 0) -> RoundContext:
    return RoundContext(round_idx=round_idx, seed=seed, num_clients=4)


@pytest.mark.parametrize("fraction,dim", [(0.1, 100), (0.25, 37), (0.5, 1), (1.0, 8), (0.3, 10)])
def test_topk_keeps_the_k_largest_of_delta_plus_residual(fraction, dim):
    rng = np.random.default_rng(dim)
    topk = TopK(fraction=fraction, num_clients=4)
    residual = np.zeros(dim, np.float32)
    for round_idx in range(1, 4):
        delta = rng.normal(size=dim).astype(np.float32)
        acc = delta + residual
        k = max(1, math.ceil(round(fraction * dim, 9)))
        keep = np.argsort(-np.abs(acc), kind="stable")[:k]  # continuous draws: no ties
        sent = topk.on_client(make_update(delta, client_id=2), ctx(round_idx)).delta.numpy()
        assert np.count_nonzero(sent) == k
        assert set(np.flatnonzero(sent)) == set(keep)
        np.testing.assert_array_equal(sent[keep], acc[keep])
        residual = acc - sent
        np.testing.assert_array_equal(topk.residual[2].numpy(), residual)


def test_error_feedback_residual_is_per_client():
    topk = TopK(fraction=0.5, num_clients=3)
    a, b = np.array([4.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 2.0, 8.0])
    topk.on_client(make_update(a, client_id=0), ctx(1))
    topk.on_client(make_update(b, client_id=1), ctx(1))
    np.testing.assert_array_equal(topk.residual[0].numpy(), [0.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(topk.residual[1].numpy(), [0.0, 0.0, 0.0, 0.0])
    # hand-computed: client 0 sends 3.0 and 1.5, keeps 0.5 and 0.25 for its next participation
    sent = topk.on_client(make_update([3.0, 0.5, 0.25, 1.5], client_id=0), ctx(2)).delta
    np.testing.assert_array_equal(sent.numpy(), [3.0, 0.0, 0.0, 1.5])
    np.testing.assert_array_equal(topk.residual[0].numpy(), [0.0, 0.5, 0.25, 0.0])
    sent = topk.on_client(make_update([0.0, 0.0, 0.0, 0.0], client_id=0), ctx(5)).delta
    np.testing.assert_array_equal(sent.numpy(), [0.0, 0.5, 0.25, 0.0])


def test_error_feedback_telescopes_exactly():
    # integer-valued deltas: every float32 sum is exact, so the identity holds bit for bit
    rng = np.random.default_rng(0)
    topk, dim = TopK(fraction=0.05, num_clients=1), 200
    total_sent, total_delta = np.zeros(dim), np.zeros(dim)
    for round_idx in range(1, 101):
        delta = rng.integers(-1000, 1000, size=dim).astype(np.float32)
        total_delta += delta
        total_sent += topk.on_client(make_update(delta), ctx(round_idx)).delta.numpy()
    np.testing.assert_array_equal(total_sent + topk.residual[0].numpy(), total_delta)
    assert np.abs(topk.residual[0].numpy()).sum() > 0  # the residual really carried something


def test_error_feedback_telescopes_for_float_deltas():
    rng = np.random.default_rng(1)
    topk, dim = TopK(fraction=0.1, num_clients=1), 64
    total_sent, total_delta = np.zeros(dim), np.zeros(dim)
    for round_idx in range(1, 51):
        delta = rng.normal(size=dim).astype(np.float32)
        total_delta += delta
        total_sent += topk.on_client(make_update(delta), ctx(round_idx)).delta.numpy()
    # only float32 rounding of delta + residual: ~50 rounds * 2^-24 * |acc| (|acc| < 20)
    np.testing.assert_allclose(total_sent + topk.residual[0].numpy(), total_delta, atol=1e-4)


def test_topk_bytes_count_values_indices_and_extras():
    update = TopK(fraction=0.1, num_clients=1).on_client(make_update(np.ones(95), extra_bytes=12), ctx())
    assert update.bytes_up == 10 * (4 + 4) + 12  # k = ceil(9.5) = 10 values and int32 indices
    assert update.delta.shape == (95,)


def test_topk_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    deltas = [(c, rng.normal(size=50).astype(np.float32)) for _ in range(6) for c in range(3)]
    straight = TopK(fraction=0.2, num_clients=3)
    first = [straight.on_client(make_update(d, c), ctx(i // 3 + 1)).delta for i, (c, d) in enumerate(deltas)]
    resumed = TopK(fraction=0.2, num_clients=3)
    for i, (c, d) in enumerate(deltas[:9]):
        resumed.on_client(make_update(d, c), ctx(i // 3 + 1))
    buf = io.BytesIO()
    torch.save(resumed.state_dict(), buf)
    buf.seek(0)
    fresh = TopK(fraction=0.2, num_clients=3)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for i, (c, d) in enumerate(deltas[9:], start=9):
        assert torch.equal(fresh.on_client(make_update(d, c), ctx(i // 3 + 1)).delta, first[i])
    for c in range(3):
        assert torch.equal(fresh.residual[c], straight.residual[c])


def _check(option: str, key: str, value) -> None:
    """The option's signature refuses `value` (as composing the config does)."""
    from fedrun import config
    from fedrun.components import check_values, component

    cfg = config.compose([f"compression={option}", f"compression.{key}={value}"], check_ranges=False)
    check_values(cfg.compression, component(cfg.compression), "compression", "compression")


def test_topk_rejects_bad_config():
    for fraction in (0.0, -0.1, 1.5):
        with pytest.raises(FedrunError, match=r"compression.fraction: .* is not allowed; allowed: a number in \(0, 1]"):
            _check("topk", "fraction", fraction)
    with pytest.raises(FedrunError, match="client id"):
        TopK(fraction=0.5, num_clients=2).on_client(make_update(np.ones(4), client_id=2), ctx())


def float32_slack(delta: np.ndarray) -> float:
    """Rounding of the decoder's float32 `lo + j * step`: a few ulps of the largest value."""
    return 4 * float(np.finfo(np.float32).eps) * float(np.abs(delta).max())


def grid_levels(decoded: np.ndarray, delta: np.ndarray, bits: int) -> np.ndarray:
    """Level index of each decoded value on the min-max grid (numpy, float64)."""
    lo, hi = float(delta.min()), float(delta.max())
    step = (hi - lo) / (2**bits - 1)
    j = np.round((decoded - lo) / step)
    np.testing.assert_allclose(decoded, lo + j * step, rtol=0, atol=float32_slack(delta))
    assert j.min() >= 0 and j.max() <= 2**bits - 1
    return j


@pytest.mark.parametrize("bits", [1, 4, 8])
def test_quantizer_is_unbiased_and_on_the_grid(bits):
    rng = np.random.default_rng(bits)
    delta = rng.normal(size=40).astype(np.float32)
    quantizer, draws = StochasticQuantizer(bits=bits), 4000
    decoded = np.stack([quantizer.on_client(make_update(delta, client_id=1), ctx(r)).delta.numpy()
                        for r in range(draws)])  # (draws, D): one seeded draw per round
    # oracle: x between levels with fractional part p -> Var = step^2 p (1 - p)
    lo, hi = float(delta.min()), float(delta.max())
    step = (hi - lo) / (2**bits - 1)
    t = (delta.astype(np.float64) - lo) / step
    p = t - np.floor(t)
    std_err = step * np.sqrt(p * (1 - p) / draws)
    # 5 standard errors per coordinate: two-sided tail 6e-7, so < 3e-5 for all 40 at once;
    # plus the float32 rounding of each decoded value (averaging does not remove a bias)
    bound = 5 * std_err + float32_slack(delta)
    decoded = decoded.astype(np.float64)
    assert np.all(np.abs(decoded.mean(axis=0) - delta) <= bound)
    # every draw is one of the two grid levels around x, so the variance is the oracle's
    j = np.stack([grid_levels(row, delta, bits) for row in decoded[:200]])  # (200, D)
    assert np.all((j == np.floor(t)) | (j == np.floor(t) + 1))


def test_quantizer_keeps_extremes_and_constants():
    delta = np.array([-2.0, 0.3, 5.0, 1.1], np.float32)
    out = StochasticQuantizer(bits=4).on_client(make_update(delta), ctx()).delta.numpy()
    assert out[0] == -2.0 and out[2] == 5.0
    const = np.full(7, 0.25, np.float32)
    np.testing.assert_array_equal(StochasticQuantizer(bits=8).on_client(make_update(const), ctx()).delta.numpy(), const)


def test_quantizer_is_seeded_per_round_and_client():
    delta = np.random.default_rng(0).normal(size=100).astype(np.float32)
    q = StochasticQuantizer(bits=2)

    def draw(client_id: int, round_idx: int, seed: int = 0) -> torch.Tensor:
        return q.on_client(make_update(delta, client_id=client_id), ctx(round_idx, seed)).delta

    assert torch.equal(draw(0, 1), draw(0, 1))
    assert not torch.equal(draw(0, 1), draw(1, 1))
    assert not torch.equal(draw(0, 1), draw(0, 2))
    assert not torch.equal(draw(0, 1), draw(0, 1, seed=1))


@pytest.mark.parametrize("bits,dim,expected", [(8, 100, 100 + 8), (4, 101, 51 + 8), (1, 9, 2 + 8), (16, 3, 6 + 8)])
def test_quantizer_bytes(bits, dim, expected):
    update = make_update(np.arange(dim, dtype=np.float32), extra_bytes=20)
    assert StochasticQuantizer(bits=bits).on_client(update, ctx()).bytes_up == expected + 20


def test_quantizer_rejects_bad_bits():
    for bits in (0, 17):
        with pytest.raises(FedrunError, match=r"compression.bits: .* is not allowed; allowed: an integer in \[1, 16\]"):
            _check("quantize", "bits", bits)


def test_compressing_twice_is_refused():
    update = TopK(fraction=0.1, num_clients=1).on_client(make_update(np.ones(80)), ctx())
    with pytest.raises(FedrunError, match="already"):
        StochasticQuantizer(bits=8).on_client(update, ctx())


def test_no_compression_is_identity():
    update = make_update(np.arange(5.0), extra_bytes=3)
    out = NoCompression().on_client(update, ctx())
    assert out.bytes_up == 23 and torch.equal(out.delta, torch.arange(5.0))
    assert NoCompression().state_dict() == {}


def test_compressed_runs_count_what_is_sent_and_resume_exactly(compose_cfg, tmp_path):
    import math

    import pandas as pd

    from fedrun import config, train

    args = ("compression=topk", "compression.fraction=0.1", "rounds=4", "checkpoint_every=2")
    whole, _ = train.train(config.build(compose_cfg(*args, f"run_dir={tmp_path / 'whole'}")))
    exp = config.build(compose_cfg(*args, f"run_dir={tmp_path / 'cut'}"))
    cut, _ = train.train(exp)
    dim = sum(p.numel() for p in exp.make_model().parameters())
    m = pd.read_csv(whole / "metrics.csv").iloc[1:]
    assert (m["bytes_up"] == m["reported"] * math.ceil(0.1 * dim - 1e-9) * 8).all()
    assert (m["bytes_down"] == m["sampled"] * dim * 4).all()
    (cut / "summary.json").unlink()
    (cut / "checkpoints" / "round_0004.pt").unlink()
    exp, rundir, ckpt = train.load_for_resume(cut)
    assert ckpt["round"] == 2 and ckpt["compression"]["residual"]  # error-feedback residuals are saved
    train.resume(exp, rundir, ckpt)
    pd.testing.assert_frame_equal(pd.read_csv(whole / "metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(cut / "metrics.csv").drop(columns="seconds"))


@pytest.mark.parametrize("overrides, expected", [
    (["privacy=secure_agg", "compression=topk"], "compression: secure aggregation sends masked"),
    (["privacy=central_dp", "sampler.kind=poisson", "privacy.secure_agg=true", "compression=quantize"],
     "compression: secure aggregation sends masked"),
])
def test_compression_that_would_void_a_guarantee_is_refused(overrides, expected):
    from fedrun import config
    from fedrun.core import FedrunError

    with pytest.raises(FedrunError, match=expected):
        config.compose(overrides)


class _SentNorms:
    """A hook placed last: records the norm of every vector that actually leaves a client."""

    def __init__(self):
        self.norms: list[float] = []

    def on_client(self, update, ctx):
        self.norms.append(float(torch.linalg.vector_norm(update.delta)))
        return update


@pytest.mark.parametrize("compression", [["compression=topk", "compression.fraction=0.05"],
                                         ["compression=quantize", "compression.bits=2"]])
def test_under_central_dp_every_sent_vector_is_within_the_clip_norm(tmp_path, compression):
    """Error feedback adds earlier leftovers to a client's next update; quantisation can move
    coordinates outward: DP must bound the vector sent, so clipping comes after compression."""
    from fedrun import config, train

    cfg = config.compose(["device=cpu", "data=synthetic", "model=logreg", "data.num_clients=10", "sampler.kind=poisson",
                      "sampler.clients_per_round=5", "privacy=central_dp", "privacy.clip_norm=0.1",
                      "privacy.noise_multiplier=0.5", "rounds=50", "eval_every=50", "client.optimizer=sgd",
                      "client.lr=0.5", *compression, f"run_dir={tmp_path / 'run'}"])
    exp = config.build(cfg)
    probe = _SentNorms()
    exp.backend.client_hooks.append(probe)
    train.train(exp)
    assert len(probe.norms) >= 200
    assert max(probe.norms) <= 0.1
    clipped = sum(n > 0.1 * (1 - 1e-4) for n in probe.norms)
    assert clipped > len(probe.norms) / 2  # the clip binds: the bound is not met by accident
