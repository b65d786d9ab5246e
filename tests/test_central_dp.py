"""Central DP's settings: adaptive clipping (Andrew et al. 2021) against a numpy transcription of
TFF's QuantileEstimatorQuery with its geometric update on the same noise draws, the count noise's
budget, delta's warning, and a target epsilon that would be ignored."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from fedrun.core import FedrunError, RoundContext, Stream, torch_generator
from tests.conftest import central_mechanism


def _mechanism(**kw):
    return central_mechanism(**({"clip_lr": 0.2, "clip_count_stddev": None, "num_params": 10, "sample_rate": 0.01}
                                | kw))


def tff_geometric_update(clip, unclipped, reported, *, expected, stddev, target, lr, draw):
    """tensorflow_privacy's QuantileEstimatorQuery.get_noised_result with geometric_update=True:
    the noised sum of (bit - 1/2) over expected records, shifted back by 1/2, clipped to [0, 1]."""
    below_estimate = (np.float64(unclipped - 0.5 * reported) + draw * stddev) / expected + 0.5
    below_estimate = min(1.0, max(0.0, below_estimate))
    return clip * math.exp(-lr * (below_estimate - target))


def test_the_clip_norm_follows_tffs_quantile_estimator_on_400_random_rounds():
    rng = np.random.default_rng(0)
    clamped = 0
    for round_idx in range(1, 401):
        expected = float(rng.integers(2, 30))
        stddev, target, lr = rng.uniform(0.1, 3), rng.uniform(0, 1), rng.uniform(0.05, 1)
        reported = int(rng.integers(0, 40))
        unclipped = int(rng.choice([0, reported, rng.integers(0, reported + 1)]))  # all, none or some
        mech = _mechanism(sample_rate=expected / 1000, clip_count_stddev=stddev, target_quantile=target,
                          clip_lr=lr, noise_multiplier=0.0)
        mech._adapt_clip_norm(unclipped, reported, RoundContext(round_idx=round_idx, seed=0, num_clients=1000))
        draw = float(torch.randn((), generator=torch_generator(0, Stream.NOISE, round_idx, 1)))
        want = tff_geometric_update(1.0, unclipped, reported, expected=expected, stddev=stddev, target=target,
                                    lr=lr, draw=draw)
        raw = (unclipped - 0.5 * reported + draw * stddev) / expected + 0.5
        clamped += not 0 <= raw <= 1
        assert mech.clip_norm == pytest.approx(want, rel=1e-12)
    assert clamped > 50  # the clamp was exercised, not just the interior


def test_a_too_small_count_noise_is_refused_with_the_condition_it_must_meet():
    with pytest.raises(FedrunError, match=r"must exceed z / 2 = 1\.5"):
        _mechanism(noise_multiplier=3.0, clip_count_stddev=1.2)


def test_the_default_count_noise_leaves_the_updates_a_budget():
    """The README's example (10 expected clients, z = 1): sigma_b = 10/20 = z/2 would leave the
    updates infinite noise; the default then takes sigma_b = z, so z_delta = z / sqrt(3/4)."""
    mech = _mechanism(sample_rate=10 / 1000)
    assert mech.clip_count_stddev == 1.0 and mech.update_noise == pytest.approx(1 / math.sqrt(0.75))
    assert _mechanism(sample_rate=100 / 1000).clip_count_stddev == 5.0  # Andrew et al.'s m / 20 where it fits


def test_a_large_delta_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="fedrun"):
        _mechanism(num_clients=100, delta=1 / 100**1.1, adaptive=False)
    assert "privacy.delta = 0.00631 is above min(1e-3, 1 / (10 N)) = 0.001" in caplog.text


def test_a_target_epsilon_that_would_be_ignored_is_refused():
    from fedrun import config

    with pytest.raises(FedrunError,
                       match="privacy.target_epsilon: 1.0 would be ignored with privacy.noise_multiplier=0.3"):
        config.compose(["privacy=central_dp", "sampler.kind=poisson", "privacy.noise_multiplier=0.3",
                        "privacy.target_epsilon=1"])
    config.compose(["privacy=central_dp", "sampler.kind=poisson", "privacy.noise_multiplier=0.3",
                    "privacy.target_epsilon=1", "privacy.stop_at_budget=true"])


def test_a_ledger_written_before_events_had_steps_loads_as_one_step_each():
    """Checkpoints of central DP runs hold their DPEvents without `steps`: each was one round."""
    from fedrun.privacy.accounting import DPEvent, Ledger

    events = [DPEvent(round=r, sample_rate=0.1, noise_multiplier=1.1, clip_norm=1.0, participants=3,
                      mechanism="dp_fedavg") for r in range(1, 6)]
    old = {"events": [{k: v for k, v in vars(e).items() if k != "steps"} for e in events]}
    mechanism = central_mechanism(adaptive=False)
    mechanism.load_state_dict({"clip_norm": 1.0, "ledger": old})
    assert mechanism.ledger.events == events and mechanism.ledger.counts == {(1.1, 0.1): 5}
    assert mechanism.round_metrics(tight=False)["epsilon"] == Ledger(events).epsilon(mechanism.delta, accountant="rdp")
