"""audit=epsilon: the one-run empirical epsilon of Andrew et al. (ICLR 2024).

The epsilon of two Gaussians is checked against the Gaussian mechanism's closed form (Balle &
Wang 2018), opacus' PRV accountant and a numerical integral; the runs check what the estimate
must show (a plain leak without noise, ~0 under heavy noise) and that canary clients are users
to the sampler and the accountant but to no client metric.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, optimize, stats

from fedrun import config, train
from fedrun.core import FedrunError
from fedrun.privacy.empirical import epsilon_lower_bound, epsilon_two_gaussians, estimate


def _gaussian_mechanism_epsilon(mu: float, delta: float) -> float:
    """Balle & Wang 2018, Theorem 8: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta
    return 0.0 if excess(0) <= 0 else optimize.brentq(excess, 0, 300, xtol=1e-13)


@pytest.mark.parametrize("mu", [0.1, 0.5, 1.0, 3.0, 10.0])
@pytest.mark.parametrize("delta", [1e-10, 1e-5, 1e-2])
def test_equal_spreads_give_the_gaussian_mechanisms_epsilon(mu, delta):
    expected = _gaussian_mechanism_epsilon(mu, delta)
    assert epsilon_two_gaussians(0.0, 1.0, mu, 1.0, delta) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # only the separation in standard deviations matters
    assert epsilon_two_gaussians(0.3, 0.02, 0.3 + 0.02 * mu, 0.02, delta) == pytest.approx(expected, rel=1e-8)


def test_equal_spreads_agree_with_opacus_prv_accountant():
    """One step of the Gaussian mechanism (q = 1) at sensitivity 1 and noise multiplier 1/mu."""
    from opacus.accountants import PRVAccountant

    for sigma in (0.8, 1.0, 2.0):
        accountant = PRVAccountant()
        accountant.history = [(sigma, 1.0, 1)]
        prv = accountant.get_epsilon(delta=1e-5, eps_error=0.01)
        ours = epsilon_two_gaussians(0.0, sigma, 1.0, sigma, 1e-5)
        assert ours <= prv <= ours + 0.02  # opacus' PRV epsilon is an upper bound within eps_error


def _delta_by_integration(m1, s1, m2, s2, eps):
    def excess(a, b):
        pa, pb = stats.norm(*a), stats.norm(*b)
        lo, hi = min(m1 - 15 * s1, m2 - 15 * s2), max(m1 + 15 * s1, m2 + 15 * s2)
        return integrate.quad(lambda x: max(0.0, pa.pdf(x) - math.exp(eps) * pb.pdf(x)), lo, hi,
                              points=[m1, m2], limit=400, epsabs=1e-13)[0]
    return max(excess((m1, s1), (m2, s2)), excess((m2, s2), (m1, s1)))


@pytest.mark.parametrize("trial", range(6))
def test_unequal_spreads_meet_delta_exactly_by_numerical_integration(trial):
    rng = np.random.default_rng(trial)
    m1, m2 = rng.uniform(0, 3, 2)
    s1, s2 = rng.uniform(0.5, 2, 2)
    delta = [0.2, 0.05, 1e-3][trial % 3]
    eps = epsilon_two_gaussians(m1, s1, m2, s2, delta)
    if eps == 0:  # already (0, delta)-close: the total variation distance is at most delta
        assert _delta_by_integration(m1, s1, m2, s2, 0.0) <= delta
        return
    assert _delta_by_integration(m1, s1, m2, s2, eps) == pytest.approx(delta, rel=1e-5)
    assert _delta_by_integration(m1, s1, m2, s2, eps * 0.9) > delta  # and it is the smallest such epsilon


def test_identical_distributions_are_zero_and_far_apart_ones_large():
    assert epsilon_two_gaussians(1.0, 2.0, 1.0, 2.0, 1e-5) == 0.0
    assert epsilon_two_gaussians(0.0, 1.0, 40.0, 1.0, 1e-5) > 500


def test_bootstrap_interval_brackets_the_estimate_and_the_truth():
    from fedrun.privacy.empirical import bootstrap_interval

    rng = np.random.default_rng(1)
    true = _gaussian_mechanism_epsilon(1.0, 1e-5)
    seen, unseen = rng.normal(1.0, 1.0, 1000), rng.normal(0.0, 1.0, 1000)
    low, high = bootstrap_interval(seen, unseen, 1e-5)
    assert low < estimate(seen, unseen, 1e-5) < high and low < true < high
    assert high - low < true  # a thousand canaries pin it down


def test_noise_floor_falls_with_the_number_of_canaries():
    from fedrun.privacy.empirical import noise_floor

    floors = [noise_floor(n, n, 1e-5) for n in (20, 100, 1000)]
    assert floors[0] > floors[1] > floors[2] > 0 and floors[2] < 0.6


def test_estimate_of_samples_and_the_lower_bound_the_samples_support():
    rng = np.random.default_rng(0)
    true = _gaussian_mechanism_epsilon(2.0, 1e-5)
    seen, unseen = rng.normal(2.0, 1.0, 2000), rng.normal(0.0, 1.0, 2000)
    assert estimate(seen, unseen, 1e-5) == pytest.approx(true, rel=0.1)
    lower = epsilon_lower_bound(seen, unseen, 1e-5)
    assert 0 < lower < true  # 95%-confidence bound: below the truth, and with 2000 samples well above 0
    same = epsilon_lower_bound(rng.normal(0, 1, 200), rng.normal(0, 1, 200), 1e-5)
    assert same < 0.5
    assert math.isnan(estimate(seen[:1], unseen, 1e-5))  # one inserted cosine has no spread to fit


# ---- runs ------------------------------------------------------------------------------------

BASE = ["device=cpu", "data=synthetic", "model=logreg", "data.num_clients=20", "data.max_client_examples=40",
        "client.local_steps=2", "client.batch_size=10", "audit=epsilon", "audit.canary_clients=40", "eval_every=5",
        "sampler.kind=poisson", "sampler.clients_per_round=12"]
DP = ["privacy=central_dp", "privacy.delta=1e-5"]


def _run(tmp_path, name, *overrides, rounds=10):
    privacy = [] if any(o.startswith("privacy=") for o in overrides) else DP
    cfg = config.compose([*BASE, *privacy, f"rounds={rounds}", f"run_dir={tmp_path / name}", *overrides])
    run_dir, summary = train.train(config.build(cfg))
    return run_dir, summary, pd.read_csv(run_dir / "metrics.csv")


def test_without_noise_the_canaries_are_plain_and_with_heavy_noise_they_vanish(tmp_path):
    _, plain, m = _run(tmp_path, "plain", "privacy.noise_multiplier=0", rounds=10)
    # Gaussian fits of few cosines differ in spread by chance (noise_floor): more canaries resolve ~0
    _, noisy, n = _run(tmp_path, "noisy", "privacy.noise_multiplier=30", "audit.canary_clients=300",
                       "sampler.clients_per_round=64", rounds=10)
    assert m["epsilon_empirical"].iloc[-1] > 10 and m["epsilon_empirical_final"].iloc[-1] > 10
    assert plain["audit"]["epsilon"]["final"]["epsilon_lower_bound"] > 1.5  # supported at 95% by 40 + 40 cosines
    audit = noisy["audit"]["epsilon"]
    for variant, column in (("all_rounds", "epsilon_empirical"), ("final", "epsilon_empirical_final")):
        floor = audit[variant]["noise_floor"]  # what the estimate shows when nothing leaks, ~0.7 here
        assert 0.2 < floor < 1.5 and n[column].iloc[-1] < 2 * floor
        assert audit[variant]["epsilon_lower_bound"] < 0.5
        low, high = audit[variant]["bootstrap_90"]
        assert low <= n[column].iloc[-1] <= high
    floor = audit["final"]["noise_floor"]
    assert plain["audit"]["epsilon"]["final"]["noise_floor"] > floor  # 40 canaries resolve less than 300
    # the accountant's bound (~0.1) is itself below what 300 canaries can resolve
    assert 0 < noisy["privacy"]["epsilon"] < floor
    # evaluated rounds only, like the accountant's tight epsilon
    assert m["epsilon_empirical"].notna().tolist() == [False] * 5 + [True] + [False] * 4 + [True]


def test_canary_clients_are_users_to_the_sampler_and_accountant_but_in_no_client_metric(tmp_path):
    run_dir, summary, m = _run(tmp_path, "run", "privacy.noise_multiplier=1", rounds=6)
    clients = pd.read_csv(run_dir / "clients.csv")
    ledger = pd.read_csv(run_dir / "privacy_ledger.csv")
    directions = pd.read_csv(run_dir / "audit_epsilon.csv")
    assert clients["client_id"].max() < 20 and (clients["client_id"] >= 0).all()
    assert summary["privacy"]["sample_rate"] == pytest.approx(12 / 60)  # q over 20 real + 40 canary clients
    assert (ledger["sample_rate"] == 12 / 60).all()
    # participants count every sent update; the real ones are the metrics' clients
    assert (ledger["participants"] - ledger["canaries"]).tolist() == m["clients"].iloc[1:].tolist()
    assert ledger["canaries"].sum() > 0
    canaries = directions[directions["kind"] == "canary"]
    assert len(canaries) == 40 and len(directions) == 80
    assert canaries["client_id"].tolist() == list(range(20, 60))
    assert canaries["insertions"].sum() == ledger["canaries"].sum()
    # a canary's update is not a client's: bytes are the real clients' only
    per_client = 61 * 10 * 4  # logreg: (60 features + bias) x 10 classes, float32
    assert (m["bytes_up"].iloc[1:] == m["clients"].iloc[1:] * per_client).all()
    cfg = json.loads((run_dir / "summary.json").read_text())["audit"]["epsilon"]
    assert cfg["canary_clients"] == 40 and cfg["real_clients"] == 20 and cfg["dimension"] == 610
    assert cfg["null_std"] == pytest.approx(610 ** -0.5)


def test_the_cosines_are_those_of_the_models_change_with_the_seeded_directions(tmp_path):
    """Recompute the final cosines independently: the directions from their documented stream."""
    import torch
    from safetensors.torch import load_file

    from fedrun.core import Stream, torch_generator
    from fedrun.privacy.epsilon_audit import EpsilonAudit

    run_dir, _, _ = _run(tmp_path, "run", "privacy.noise_multiplier=1", rounds=3)
    exp = config.build(config.compose([*BASE, *DP, "rounds=3", f"run_dir={tmp_path / 'unused'}"]))
    initial = exp.server_model.initial_weights()
    model = exp.make_model()
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    final = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert isinstance(exp.audit, EpsilonAudit)
    rows = torch.randn(80, initial.numel(), generator=torch_generator(0, Stream.AUDIT)).double()
    change = (final - initial).double()
    cosines = (rows @ change) / (rows.norm(dim=1) * change.norm())
    directions = pd.read_csv(run_dir / "audit_epsilon.csv")
    np.testing.assert_allclose(directions["cosine_final"], cosines.numpy(), rtol=1e-4, atol=1e-6)


def test_resume_gives_the_same_estimate(tmp_path):
    whole, _, m = _run(tmp_path, "whole", "privacy.noise_multiplier=0.5", "checkpoint_every=2", rounds=6)

    class Stop(Exception):
        pass

    def stop_at_3(row):
        if row["round"] == 3:
            raise Stop

    cfg = config.compose([*BASE, *DP, "rounds=6", f"run_dir={tmp_path / 'cut'}", "privacy.noise_multiplier=0.5",
                          "checkpoint_every=2"])
    with pytest.raises(Stop):
        train.train(config.build(cfg), on_round=stop_at_3)
    exp, rundir, checkpoint = train.load_for_resume(tmp_path / "cut")
    assert checkpoint is not None and checkpoint["round"] == 2
    train.resume(exp, rundir, checkpoint)
    cut = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    pd.testing.assert_frame_equal(m.drop(columns="seconds"), cut.drop(columns="seconds"))
    pd.testing.assert_frame_equal(pd.read_csv(whole / "audit_epsilon.csv"),
                                  pd.read_csv(tmp_path / "cut" / "audit_epsilon.csv"))


@pytest.mark.parametrize("extra", [["privacy.adaptive=true", "privacy.clip_count_stddev=1"],
                                   ["privacy.secure_agg=true"]])
def test_adaptive_clipping_and_secure_aggregation_keep_the_estimate(tmp_path, extra):
    """Secure aggregation sums the same clipped vectors (up to its fixed point); adaptive clipping
    scales the canaries with the clip norm each round."""
    common = ["privacy.noise_multiplier=0.5", "sampler.clients_per_round=24", "privacy.secagg_min_clients=2"]
    _, plain_summary, plain = _run(tmp_path, "plain", *common, rounds=5)
    _, summary, m = _run(tmp_path, "with", *common, *extra, rounds=5)
    assert math.isfinite(m["epsilon_empirical"].iloc[-1])
    if "privacy.secure_agg=true" in extra:
        assert m["epsilon_empirical"].iloc[-1] == pytest.approx(plain["epsilon_empirical"].iloc[-1], rel=1e-2)
    else:
        assert summary["privacy"]["clip_norm"] != plain_summary["privacy"]["clip_norm"]


def test_without_privacy_the_canary_norm_is_required_and_used(tmp_path):
    with pytest.raises(FedrunError, match=r"^audit.canary_norm: privacy=none has no clip norm"):
        config.compose([*BASE, "privacy=none", "rounds=2", f"run_dir={tmp_path / 'x'}"])
    _, summary, m = _run(tmp_path, "none", "privacy=none", "audit.canary_norm=1.0", rounds=5)
    assert m["epsilon_empirical"].iloc[-1] > 10  # nothing hides a canary from an unprotected average


@pytest.mark.parametrize("overrides,message", [
    (["privacy=local_dp"], r"^audit: epsilon measures a user-level guarantee"),
    (["strategy=scaffold", "client.optimizer=sgd", "privacy=secure_agg"],
     r"^audit: epsilon's canary clients send an update and nothing else"),
])
def test_combinations_it_cannot_measure_are_refused(tmp_path, overrides, message):
    with pytest.raises(FedrunError, match=message):
        privacy = [] if any(o.startswith("privacy=") for o in overrides) else DP
        config.compose([*BASE, *privacy, *overrides, f"run_dir={tmp_path / 'x'}"])


def test_with_text_canaries_one_run_gives_exposure_and_empirical_epsilon(compose_cfg):
    cfg = compose_cfg("audit=epsilon", "audit.canary_clients=10", "audit.num_canaries=2", "audit.repeats=2",
                      "audit.num_references=20", "audit.secret_digits=3", "privacy=central_dp",
                      "sampler.kind=poisson", "privacy.noise_multiplier=0.5", "data.seq_len=32")
    run_dir, summary = train.train(config.build(cfg))
    m = pd.read_csv(run_dir / "metrics.csv")
    assert {"canary_exposure", "epsilon_empirical", "epsilon_empirical_final"} <= set(m.columns)
    assert m["canary_exposure"].notna().all() and m["epsilon_empirical"].iloc[1:].notna().all()
    assert len(summary["audit"]["exposures"]) == 2 and summary["audit"]["epsilon"]["canary_clients"] == 10


def test_report_shows_the_empirical_epsilon(tmp_path):
    from fedrun.report import report

    _run(tmp_path / "runs", "a", "privacy.noise_multiplier=0.5", rounds=5)
    _, written = report([tmp_path / "runs"], out=tmp_path / "out")
    csv = pd.read_csv(tmp_path / "out" / "report.csv")
    assert "epsilon_empirical_mean" in csv.columns and csv["epsilon_empirical_mean"].notna().all()
    assert any(p.name == "utility_vs_epsilon.png" for p in written)


def test_with_lora_the_directions_live_in_the_adapters_space(compose_cfg, tmp_path):
    pytest.importorskip("peft")
    exp = config.build(compose_cfg("model=hf", "model.from_config.n_embd=16", "model.from_config.n_layer=1",
                                   "model.lora.r=2", "rounds=3", "data.seq_len=16", "data.min_samples=4",
                                   "audit=epsilon", "audit.canary_clients=20", "privacy=central_dp",
                                   "sampler.kind=poisson", "sampler.clients_per_round=8",
                                   "privacy.noise_multiplier=0", f"run_dir={tmp_path / 'lora'}", tiny=False))
    adapters = sum(p.numel() for p in exp.make_model().parameters() if p.requires_grad)
    run_dir, summary = train.train(exp)
    assert summary["audit"]["epsilon"]["dimension"] == adapters == 2 * (16 + 3 * 16)
    assert pd.read_csv(run_dir / "metrics.csv")["epsilon_empirical"].iloc[-1] > 2  # no noise: plainly visible


def test_lora_methods_that_do_not_average_the_adapters_are_refused(compose_cfg):
    with pytest.raises(FedrunError, match=r"^model.lora.aggregation: audit=epsilon .* allowed: avg, ffa"):
        compose_cfg("model=hf", "model.lora.aggregation=fedsa", "audit=epsilon", "privacy=central_dp",
                    "sampler.kind=poisson", tiny=False)


def test_the_results_on_screen_show_the_target_and_the_empirical_estimate(tmp_path):
    from typer.testing import CliRunner

    from fedrun.cli import app

    common = ["train", *BASE, "data.num_clients=20", "rounds=3", "privacy=central_dp", "privacy.delta=1e-4"]
    result = CliRunner().invoke(app, [*common, "privacy.noise_multiplier=null", "privacy.target_epsilon=8",
                                      f"run_dir={tmp_path / 'target'}"])
    assert result.exit_code == 0, result.output
    assert "target epsilon 8" in " ".join(result.output.split())  # the line wraps in a narrow terminal
    result = CliRunner().invoke(app, [*common, "privacy.noise_multiplier=1", f"run_dir={tmp_path / 'audit'}"])
    assert result.exit_code == 0, result.output
    line = " ".join(result.output.split())
    assert "empirical epsilon (audit=epsilon," in line and "from every round's model (90%" in line
    assert "a point estimate this loose says little" in line  # 3 rounds insert few canaries: warned
