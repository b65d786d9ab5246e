"""Central DP, accounting and secure aggregation in the round loop, against independent computations."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf
from opacus.accountants import PRVAccountant, RDPAccountant

from fedrun import config, train
from fedrun.core import ClientUpdate, RoundContext, Stream, torch_generator
from fedrun.privacy.accounting import DPEvent, Ledger, calibrate_noise
from fedrun.privacy.central import CentralPrivacy as central
from fedrun.strategies.fedavg import FedAvg
from tests.conftest import TINY

DP = ["privacy=central_dp", "sampler.kind=poisson"]


def _mechanism(**kw):
    opts = dict(clip_norm=1.0, noise_multiplier=0.0, target_epsilon=None, delta=1e-3, accountant="rdp",
                stop_at_budget=False, adaptive=False, target_quantile=0.5, clip_lr=0.2, clip_count_stddev=None,
                secure_agg=False, secagg_bits=16, secagg_threshold=0.5, secagg_min_clients=3, log_client_stats=False,
                noise_source="seed", num_clients=20, num_params=50,
                sample_rate=0.25, rounds=10, seed=0, device=torch.device("cpu"))
    return central(**(opts | kw))


def _update(cid, delta):
    return ClientUpdate(client_id=cid, delta=delta, num_examples=cid + 1, train_loss=0.0, seconds=0.0, bytes_up=0)


def _clipped_updates(mech, deltas, ctx):
    return [mech.on_client(_update(i, d.clone()), ctx) for i, d in enumerate(deltas)]


def test_clients_clip_to_the_norm_and_the_server_divides_the_sum_by_expected_clients():
    mech = _mechanism()
    ctx = RoundContext(round_idx=1, seed=0, num_clients=20, cohort=[0, 1, 2])
    rng = np.random.default_rng(0)
    raw = [rng.normal(size=50).astype(np.float32) * s for s in (0.01, 1.0, 10.0)]
    updates = _clipped_updates(mech, [torch.from_numpy(r) for r in raw], ctx)
    for u, r in zip(updates, raw):
        expected = r * min(1.0, 1.0 / np.linalg.norm(r.astype(np.float64)))
        np.testing.assert_allclose(u.delta.numpy(), expected, rtol=2e-6)  # clipped a millionth below C
    assert [float(u.extras["unclipped"]) for u in updates] == [1.0, 0.0, 0.0]
    total = sum(r * min(1.0, 1.0 / np.linalg.norm(r.astype(np.float64))) for r in raw)
    got = mech.aggregate(updates, ctx, FedAvg())
    np.testing.assert_allclose(got.numpy(), total / (0.25 * 20), rtol=1e-5, atol=1e-7)  # q N = 5, not 3


def test_noise_has_std_z_c_over_expected_clients_and_is_seeded():
    mech = _mechanism(noise_multiplier=2.0, clip_norm=0.5, num_params=20000)
    ctx = RoundContext(round_idx=3, seed=0, num_clients=20, cohort=[0])
    zero = [_update(0, torch.zeros(20000))]
    a = mech.aggregate(zero, ctx, FedAvg())
    expected_std = 2.0 * 0.5 / 5
    assert abs(float(a.std()) - expected_std) < 4 * expected_std / math.sqrt(2 * 20000)
    assert abs(float(a.mean())) < 4 * expected_std / math.sqrt(20000)
    again = _mechanism(noise_multiplier=2.0, clip_norm=0.5, num_params=20000)
    assert torch.equal(a, again.aggregate(zero, ctx, FedAvg()))


def test_ledger_epsilon_equals_opacus_accountants_stepped_directly():
    ledger, rdp, prv = Ledger(), RDPAccountant(), PRVAccountant()
    for r, (z, q) in enumerate([(1.1, 0.1)] * 30 + [(0.9, 0.05)] * 20):
        ledger.record(DPEvent(round=r, sample_rate=q, noise_multiplier=z, clip_norm=1.0, participants=3, mechanism="x"))
        rdp.step(noise_multiplier=z, sample_rate=q)
        prv.step(noise_multiplier=z, sample_rate=q)
    assert ledger.epsilon(1e-5, accountant="rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-9)
    assert ledger.epsilon(1e-5, accountant="prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-6)
    assert ledger.epsilon(1e-5, accountant="prv") < ledger.epsilon(1e-5, accountant="rdp")


def test_calibrated_noise_spends_the_target_epsilon_over_the_planned_rounds():
    z = calibrate_noise(target_epsilon=3.0, delta=1e-4, sample_rate=0.1, rounds=40, accountant="rdp")
    ledger = Ledger([DPEvent(r, 0.1, z, 1.0, 5, "x") for r in range(40)])
    assert 2.85 < ledger.epsilon(1e-4, accountant="rdp") <= 3.0


def test_adaptive_clipping_follows_andrew_et_al():
    mech = _mechanism(adaptive=True, noise_multiplier=1.0, clip_count_stddev=0.8, target_quantile=0.3, clip_lr=0.5)
    # Composite noise: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2 = (1 - 1/2.56)^-1/2
    assert mech.update_noise == pytest.approx((1 - 1 / 2.56) ** -0.5)
    ctx = RoundContext(round_idx=2, seed=0, num_clients=20, cohort=[0, 1, 2, 3])
    updates = _clipped_updates(mech, [torch.full((50,), v) for v in (0.01, 0.05, 1.0, 2.0)], ctx)
    mech.aggregate(updates, ctx, FedAvg())
    draw = float(torch.randn((), generator=torch_generator(0, Stream.NOISE, 2, 1)))
    noisy_fraction = ((2 - 4 * 0.5) + draw * 0.8) / 5 + 0.5  # 2 of 4 unclipped, centred at 1/2
    assert mech.clip_norm == pytest.approx(1.0 * math.exp(-0.5 * (noisy_fraction - 0.3)))


def test_secure_aggregation_gives_the_clipped_sum_within_the_quantisation_bound():
    ctx = RoundContext(round_idx=1, seed=0, num_clients=20, cohort=[0, 1, 2, 3, 4])
    deltas = [torch.randn(50, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    plain, secure = _mechanism(), _mechanism(secure_agg=True, secagg_bits=12)
    secure.begin_round(ctx)
    a = plain.aggregate(_clipped_updates(plain, deltas, ctx), ctx, FedAvg())
    sent = _clipped_updates(secure, deltas, ctx)
    assert all(u.delta.dtype == torch.uint32 for u in sent)  # all the server ever sees
    b = secure.aggregate(sent, ctx, FedAvg())
    scale = 2 * 1.0 / (2**12 - 1)
    assert (a - b).abs().max() <= 5 * scale / 5 + 1e-7  # n steps of the grid, over q N = 5
    assert secure.round_metrics(tight=False)["secagg_bytes_per_client"] > 0


def _run(compose_cfg, tmp_path, name, *overrides):
    return train.train(config.build(compose_cfg(*DP, "sampler.clients_per_round=3", f"run_dir={tmp_path / name}",
                                                *overrides)))


def test_dp_run_logs_epsilon_every_round_and_a_ledger(compose_cfg, tmp_path):
    run_dir, summary = _run(compose_cfg, tmp_path, "dp", "rounds=4", "eval_every=2", "privacy.noise_multiplier=1.2")
    m = pd.read_csv(run_dir / "metrics.csv")
    assert m["epsilon_rdp"].iloc[1:].is_monotonic_increasing and m["epsilon_rdp"].iloc[1:].notna().all()
    assert m["epsilon_prv"].notna().tolist() == [False, False, True, False, True]
    ledger = pd.read_csv(run_dir / "privacy_ledger.csv")
    assert ledger["round"].tolist() == [1, 2, 3, 4] and (ledger["sample_rate"] == 0.5).all()
    assert (ledger["participants"] == m["reported"].iloc[1:].values).all()
    direct = RDPAccountant()
    for _ in range(4):
        direct.step(noise_multiplier=1.2, sample_rate=0.5)
    p = summary["privacy"]
    assert p["epsilon_rdp"] == pytest.approx(direct.get_epsilon(p["delta"]))
    assert p["delta"] == pytest.approx(1 / 6**1.1)
    state = torch.load(run_dir / "checkpoints" / "round_0004.pt", weights_only=True)["privacy"]
    assert len(state["ledger"]["events"]) == 4


def test_stop_at_budget_stops_before_exceeding_it(compose_cfg, tmp_path):
    run_dir, summary = _run(compose_cfg, tmp_path, "budget", "rounds=30", "privacy.noise_multiplier=0.8",
                            "privacy.target_epsilon=3", "privacy.stop_at_budget=true", "eval_every=100")
    assert summary["stopped_at_budget"] and summary["rounds"] < 30
    eps = pd.read_csv(run_dir / "metrics.csv")["epsilon"]
    assert eps.iloc[-1] <= 3 and summary["privacy"]["epsilon"] <= 3
    ledger = Ledger([DPEvent(r, 0.5, 0.8, 1.0, 3, "x") for r in range(summary["rounds"] + 1)])
    assert ledger.epsilon(summary["privacy"]["delta"], accountant="rdp") > 3  # one more round would overshoot
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_target_epsilon_calibrates_the_noise_for_the_planned_rounds(compose_cfg, tmp_path):
    run_dir, summary = _run(compose_cfg, tmp_path, "cal", "rounds=10", "privacy.noise_multiplier=null",
                            "privacy.target_epsilon=4", "eval_every=100")
    assert 3.8 < summary["privacy"]["epsilon"] <= 4.0 and summary["rounds"] == 10
    expected = calibrate_noise(target_epsilon=4, delta=summary["privacy"]["delta"], sample_rate=0.5, rounds=10,
                               accountant="rdp")
    assert summary["privacy"]["noise_multiplier"] == expected


def test_resumed_dp_run_has_exactly_the_same_epsilon(compose_cfg, tmp_path):

    whole, _ = _run(compose_cfg, tmp_path, "whole", "rounds=6", "checkpoint_every=2", "privacy.adaptive=true",
                    "privacy.clip_count_stddev=1.0")
    cut, _ = _run(compose_cfg, tmp_path, "cut", "rounds=6", "checkpoint_every=2", "privacy.adaptive=true",
                    "privacy.clip_count_stddev=1.0")
    (cut / "summary.json").unlink()
    for r in (6, 4):  # stopped just after round 2's checkpoint
        (cut / "checkpoints" / f"round_{r:04d}.pt").unlink()
    exp, rundir, ckpt = train.load_for_resume(cut)
    assert ckpt["round"] == 2
    train.resume(exp, rundir, ckpt)
    for name in ("metrics.csv", "privacy_ledger.csv"):
        a, b = pd.read_csv(whole / name), pd.read_csv(cut / name)
        pd.testing.assert_frame_equal(a.drop(columns="seconds", errors="ignore"),
                                      b.drop(columns="seconds", errors="ignore"))


def test_secure_agg_run_with_dropouts_recovers_and_reports_its_cost(compose_cfg, tmp_path):
    run_dir, _ = _run(compose_cfg, tmp_path, "sa", "privacy=secure_agg", "sampler.kind=uniform", "rounds=3",
                      "sampler.dropout=0.3", "sampler.clients_per_round=5")
    m = pd.read_csv(run_dir / "metrics.csv").iloc[1:]
    assert (m["secagg_bytes_per_client"] > 0).all() and (m["secagg_seconds"] > 0).all()
    assert "epsilon" not in m.columns
    assert m["eval_loss"].iloc[-1] < pd.read_csv(run_dir / "metrics.csv")["eval_loss"].iloc[0]


def test_secure_agg_below_threshold_aborts_the_round_and_keeps_the_model(compose_cfg, tmp_path, caplog):
    run_dir, _ = _run(compose_cfg, tmp_path, "abort", "privacy=secure_agg", "sampler.kind=uniform", "rounds=4",
                      "eval_every=1", "sampler.dropout=0.5", "sampler.clients_per_round=5",
                      "privacy.secagg_threshold=1.0")
    m = pd.read_csv(run_dir / "metrics.csv")
    aborted = m.index[(m["dropped"] > 0) & (m["round"] > 0)]
    assert len(aborted) > 0 and "secure aggregation aborted" in caplog.text
    for i in aborted:
        assert m.loc[i, "eval_loss"] == m.loc[i - 1, "eval_loss"]


@pytest.mark.parametrize("overrides, expected", [
    (["privacy=central_dp"], "sampler.kind: privacy=central_dp needs sampler.kind=poisson"),
    ([*DP, "strategy=median"], "strategy: median cannot be combined with privacy=central_dp"),
    ([*DP, "strategy=feddf"], "strategy: feddf cannot be combined with privacy=central_dp"),
    ([*DP, "strategy=scaffold", "client.optimizer=sgd"], "strategy: scaffold cannot be combined"),
    ([*DP, "privacy.stop_at_budget=true"], "privacy.stop_at_budget: needs privacy.target_epsilon"),
    (["privacy=secure_agg", "privacy.secagg_bits=30"], "privacy.secagg_bits: 30 bits leave no room"),
    ([*DP, "privacy.clip_norm=0"], "privacy.clip_norm: 0.0 is not allowed"),
    ([*DP, "privacy.noise_multiplier=null"], "privacy.noise_multiplier: null means calibrate"),
])
def test_configurations_that_void_the_guarantee_are_refused(overrides, expected):
    from fedrun.core import FedrunError

    with pytest.raises(FedrunError, match=expected.replace("(", r"\(")):
        config.compose(overrides)


# (option, key, a value out of range, what is allowed): the words checks.RULES gave, now made by
# the markers of each mechanism's signature (fedrun/components.py)
RANGES = [
    ("central_dp", "clip_norm", 0.0, "a number > 0"),
    ("central_dp", "noise_multiplier", -1.0, "null (calibrate from privacy.target_epsilon) or a number >= 0"),
    ("central_dp", "target_epsilon", math.inf, "null or a finite number > 0"),
    ("central_dp", "target_epsilon", 0.0, "null or a finite number > 0"),
    ("central_dp", "delta", 1.0, "null or a number in (0, 1)"),
    ("central_dp", "accountant", "gdp", "one of rdp, prv"),
    ("central_dp", "target_quantile", 1.5, "a number in [0, 1]"),
    ("central_dp", "clip_lr", -0.1, "a number >= 0"),
    ("central_dp", "clip_count_stddev", 0.0, "null or a number > 0"),
    ("central_dp", "secagg_bits", 33, "null (the most the cohort allows) or an integer in [1, 32]"),
    ("central_dp", "secagg_bits", 0, "null (the most the cohort allows) or an integer in [1, 32]"),
    ("central_dp", "secagg_threshold", 0.0, "a number in (0, 1]"),
    ("central_dp", "secagg_min_clients", 1, "an integer >= 2"),
    ("central_dp", "noise_source", "urandom", "one of seed, os"),
    ("secure_agg", "secagg_range", 0.0, "a number > 0"),
    ("secure_agg", "secagg_bits", 33, "null (the most the cohort allows) or an integer in [1, 32]"),
    ("secure_agg", "secagg_threshold", 1.5, "a number in (0, 1]"),
    ("secure_agg", "secagg_min_clients", 1, "an integer >= 2"),
    ("secure_agg", "noise_source", "urandom", "one of seed, os"),
    ("local_dp", "max_grad_norm", 0.0, "a number > 0"),
    ("local_dp", "noise_multiplier", -1.0, "a number >= 0"),
    ("local_dp", "delta", 0.0, "a number in (0, 1)"),
    ("local_dp", "accountant", "gdp", "one of rdp, prv"),
    ("local_dp", "noise_source", "urandom", "one of seed, os"),
]


@pytest.mark.parametrize("option, key, value, allowed", RANGES)
def test_each_privacy_range_is_a_marker_of_its_mechanisms_signature(option, key, value, allowed):
    from fedrun.components import check_values, component, typed_node
    from fedrun.core import FedrunError

    node = OmegaConf.load(config.conf_dir() / "privacy" / f"{option}.yaml")
    check_values(typed_node(node, component(node), "privacy", "privacy"), component(node), "privacy", "privacy")
    node[key] = value
    typed = typed_node(node, component(node), "privacy", "privacy")
    with pytest.raises(FedrunError) as refused:
        check_values(typed, component(node), "privacy", "privacy")
    assert str(refused.value) == f"privacy.{key}: {value!r} is not allowed; allowed: {allowed}"


def test_the_fixed_point_width_has_one_range():
    """The signatures' secagg_bits range is the one fixedpoint enforces (once [1, 31] against [1, 32])."""
    from fedrun.components import config_keys
    from fedrun.privacy.fixedpoint import MAX_BITS, MIN_BITS, validate_capacity
    from fedrun.privacy.secure_agg import SecureAggregation

    for mechanism in (central, SecureAggregation):
        (bits,) = [k for k in config_keys(mechanism, "privacy") if k.name == "secagg_bits"]
        assert [b for b in range(-1, 40) if bits.markers[0].allows(b)] == list(range(MIN_BITS, MAX_BITS + 1))
    validate_capacity(1, bits=MAX_BITS)
    with pytest.raises(ValueError, match=r"\[1, 32\]"):
        validate_capacity(1, bits=MAX_BITS + 1)


@pytest.mark.parametrize("option, dp_level, secure_sum", [
    ("none", None, False), ("central_dp", "user", "secure_agg"), ("secure_agg", None, True),
    ("local_dp", "example", False),
])
def test_mechanisms_declare_their_capabilities(option, dp_level, secure_sum):
    from fedrun.components import CAPABILITIES, capability

    node = OmegaConf.load(config.conf_dir() / "privacy" / f"{option}.yaml")
    assert capability(node, "privacy", "dp_level") == dp_level
    assert capability(node, "privacy", "secure_sum") == secure_sum
    if isinstance(secure_sum, str):  # the name of a boolean key of its own config
        assert isinstance(node[secure_sum], bool)
    assert set(CAPABILITIES["privacy"]) == {"dp_level", "secure_sum"}


# ---- epsilon is never negative; target_epsilon's range -----------------------------------------

GRID = [(z, q, steps) for z in (0.7, 2.0, 8.0) for q in (0.01, 0.2, 1.0) for steps in (1, 30)]


@pytest.mark.parametrize("delta", [1e-5, 0.1])
def test_epsilon_is_never_negative_and_is_opacus_stepped_directly_elsewhere(delta):
    """Where opacus' conversion is negative, delta exceeds the mechanism's total variation distance
    (one step: q (2 Phi(1 / 2z) - 1)), so it is (0, delta)-DP and 0 is reported."""
    from scipy.stats import norm

    negative = 0
    for z, q, steps in GRID:
        ledger = Ledger([DPEvent(r, q, z, 1.0, 3, "x") for r in range(steps)])
        for name, accountant in (("rdp", RDPAccountant()), ("prv", PRVAccountant())):
            for _ in range(steps):
                accountant.step(noise_multiplier=z, sample_rate=q)
            direct, ours = accountant.get_epsilon(delta), ledger.epsilon(delta, accountant=name)
            assert ours >= 0 and ours == pytest.approx(max(direct, 0.0), rel=1e-9, abs=1e-12), (z, q, steps, name)
            if direct < 0:
                negative += 1
                assert steps > 1 or q * (2 * norm.cdf(1 / (2 * z)) - 1) < delta, (z, q, steps, name)
    assert negative > 0 if delta == 0.1 else negative == 0  # the grid reaches the clamp, and only at a large delta


def test_calibration_that_cannot_reach_the_target_is_one_line():
    from fedrun.core import FedrunError

    for accountant, least in (("rdp", "0.103"), ("prv", "0.01")):
        with pytest.raises(FedrunError, match=rf"^privacy.target_epsilon: 1e-09 cannot be reached at delta 1e-05 over "
                                              rf"2 rounds .* no less than about {least} at this delta\); allowed:"):
            calibrate_noise(target_epsilon=1e-9, delta=1e-5, sample_rate=0.1, rounds=2, accountant=accountant)


@pytest.mark.parametrize("value, expected", [
    ("inf", "privacy.target_epsilon: inf is not allowed; allowed: null or a finite number > 0"),
    ("1e-9", "privacy.target_epsilon: 1e-09 cannot be reached at delta 1e-05 over 2 rounds"),
])
def test_target_epsilon_out_of_reach_is_one_line_exit_2(play, tmp_path, value, expected):
    from typer.testing import CliRunner

    from fedrun.cli import app

    result = CliRunner().invoke(app, ["train", "data=shakespeare", f"data.path={play}", "device=cpu", *TINY, *DP,
                                      f"run_dir={tmp_path / 'run'}", "rounds=2", "privacy.noise_multiplier=null",
                                      f"privacy.target_epsilon={value}", "privacy.delta=1e-5"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith(f"error: {expected}"), lines[0]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_tiny_target_epsilon_at_a_large_delta_runs_and_reports_epsilon_0(compose_cfg, tmp_path, accountant):
    """6 clients: delta = 6^-1.1 = 0.14, which heavy noise satisfies at epsilon 0 (opacus: about -0.009)."""
    run_dir, summary = _run(compose_cfg, tmp_path, accountant, "rounds=2", "eval_every=1",
                            "privacy.noise_multiplier=null",
                            "privacy.target_epsilon=1e-9", f"privacy.accountant={accountant}")
    m = pd.read_csv(run_dir / "metrics.csv").iloc[1:]
    assert (m["epsilon"] == 0).all() and (m[["epsilon_rdp", "epsilon_prv"]] >= 0).all().all()
    p = summary["privacy"]
    assert p["epsilon"] == 0 and p["epsilon_rdp"] >= 0 and p["epsilon_prv"] >= 0
