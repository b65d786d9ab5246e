"""Secure aggregation computes the strategy's aggregate and nothing else (issue #22), and holds
its limits (issue #15): minimum cohort, Shamir threshold, consistent unmasking, hidden per-client
fields, the adaptive-clipping bit inside the masked sum, and the delta charged for skipped rounds."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import binom

from fedrun import config, train
from fedrun.core import ClientUpdate, FedrunError, RoundContext
from fedrun.privacy.masking import SecAggAbort
from fedrun.privacy.secagg_skips import epsilon_with_skips, flip_probability
from fedrun.privacy.secure_agg import SecureAggregation
from fedrun.privacy.secure_round import SecureSumRound, most_bits, shamir_threshold
from fedrun.strategies.fedavg import FedAvg
from fedrun.strategies.median import Median
from tests.conftest import central_mechanism

SYNTHETIC = ["device=cpu", "data=synthetic", "model=logreg", "data.num_clients=30", "sampler.clients_per_round=6",
             "eval_every=1"]


def _secure(strategy=None, **kw):
    opts = dict(secagg_bits=None, secagg_threshold=0.5, secagg_min_clients=3, secagg_range=1.0,
                log_client_stats=False, noise_source="seed", strategy=strategy or FedAvg(), num_params=40,
                max_examples=50, seed=0)
    return SecureAggregation(**(opts | kw))


def _updates(n: int, *, scale: float = 0.1, seed: int = 0) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    return [ClientUpdate(client_id=i, delta=torch.randn(40, generator=g) * scale, num_examples=5 + 7 * i,
                         train_loss=1.0, seconds=0.0, bytes_up=160) for i in range(n)]


def _secure_mean(mech, updates, ctx, *, report=None):
    mech.begin_round(ctx)
    sent = [mech.on_client(ClientUpdate(**{**u.__dict__, "delta": u.delta.clone()}), ctx) for u in updates]
    assert all(s.delta.dtype == torch.uint32 for s in sent)  # the server sees masked words only
    reporting = [s for s in sent if report is None or s.client_id in report]
    return mech.aggregate(reporting, ctx, FedAvg())


def test_the_secure_mean_is_fedavgs_weighted_mean_within_the_fixed_point_bound():
    """|secure - exact| <= n s w_max / W per coordinate, s = 2 R / (2^b - 1); dropouts recovered by Shamir."""
    updates, ctx = _updates(6), RoundContext(round_idx=1, seed=0, num_clients=30, cohort=list(range(6)))
    survivors = [0, 2, 3, 5]  # clients 1 and 4 drop after masking: their pairwise masks are rebuilt
    kept = [u for u in updates if u.client_id in survivors]
    w = np.array([u.num_examples for u in kept], dtype=np.float64)
    exact = (np.stack([u.delta.double().numpy() for u in kept]) * w[:, None]).sum(0) / w.sum()  # numpy FedAvg
    mech = _secure(secagg_bits=10)
    got = _secure_mean(mech, updates, ctx, report=set(survivors)).double().numpy()
    bound = len(kept) * (2 * 1.0 / (2**10 - 1)) * 50 / w.sum()
    err = np.abs(got - exact).max()
    assert 0 < err <= bound  # rounding happened, and stays inside the derived bound
    assert mech.round_metrics(tight=False)["secagg_clamped"] == 0.0
    full = _secure(secagg_bits=None)  # the most bits a cohort of 6 allows: 29
    assert np.abs(_secure_mean(full, updates, ctx, report=set(survivors)).double().numpy() - exact).max() < 1e-7


def test_coordinates_outside_the_range_are_clamped_and_counted():
    updates, ctx = _updates(4, scale=1.0), RoundContext(round_idx=1, seed=0, num_clients=30, cohort=[0, 1, 2, 3])
    mech = _secure(secagg_range=0.05, max_examples=26)  # weights up to 26/26: many coordinates exceed 0.05
    _secure_mean(mech, updates, ctx)
    expected = sum(int(((u.delta.double() * u.num_examples / 26).abs() > 0.05).sum()) for u in updates) / (4 * 40)
    assert mech.round_metrics(tight=False)["secagg_clamped"] == pytest.approx(expected) and expected > 0.3


def test_a_cohort_below_the_minimum_is_skipped_and_sends_nothing():
    mech, ctx = _secure(secagg_min_clients=3), RoundContext(round_idx=4, seed=0, num_clients=30, cohort=[7, 9])
    mech.begin_round(ctx)
    sent = [mech.on_client(u, ctx) for u in _updates(2)]
    assert all(u.delta.numel() == 0 and u.bytes_up == 0 for u in sent)
    assert mech.aggregate(sent, ctx, FedAvg()) is None
    assert mech.round_metrics(tight=False)["secagg_skipped"] == 1 and mech.summary()["skipped_rounds"] == 1


def test_the_shamir_threshold_is_never_below_two():
    assert shamir_threshold(10, 0.01) == 2 and shamir_threshold(3, 0.5) == 2 and shamir_threshold(10, 0.55) == 6
    assert most_bits(1) == 32 and most_bits(10) == 28 and most_bits(16) == 28 and most_bits(17) == 27


def test_strategies_that_need_individual_updates_are_refused():
    with pytest.raises(FedrunError, match="needs the individual client updates"):
        _secure(strategy=Median())


def test_a_client_refuses_a_second_unmasking_request_that_contradicts_the_first():
    """A lying server asks once with client 0 as a survivor (getting b_0) and once as dropped
    (getting s_0^SK): with both it could strip every mask of y_0. The client must refuse."""
    rnd = SecureSumRound([0, 1, 2, 3], round_seed=5, threshold=2, length=8, value_range=1.0, bits=16)
    masked = {u: rnd.client_mask(u, torch.full((8,), 0.1 * u)) for u in range(4)}
    rnd.server_sum(masked)  # honest round: every client answered with 0 as a survivor
    with pytest.raises(SecAggAbort, match="contradicts an earlier one"):
        rnd._answer(1, frozenset({1, 2, 3}), frozenset({0}))
    fresh = SecureSumRound([0, 1, 2, 3], round_seed=6, threshold=2, length=8, value_range=1.0, bits=16)
    fresh._answer(1, frozenset({1, 2, 3}), frozenset({0}))  # the same request alone is answered


def test_fedavg_with_and_without_secure_aggregation_end_at_the_same_model(tmp_path):
    """The issue's set-up, smaller: same seed, dropouts recovered through Shamir shares."""
    common = [*SYNTHETIC, "rounds=6", "sampler.kind=poisson", "sampler.dropout=0.2", "seed=3"]
    runs = {}
    for privacy in ("none", "secure_agg"):
        run_dir, summary = train.train(config.build(config.compose(
            [*common, f"privacy={privacy}", f"run_dir={tmp_path / privacy}"])))
        runs[privacy] = (pd.read_csv(run_dir / "metrics.csv"), summary)
    plain, secure = runs["none"][0], runs["secure_agg"][0]
    assert (secure["dropped"] > 0).any() and (secure["secagg_skipped"].iloc[1:] == 0).all()
    assert (secure["secagg_clamped"].iloc[1:] == 0).all()
    np.testing.assert_allclose(secure["eval_loss"], plain["eval_loss"], rtol=1e-5)
    assert plain["eval_loss"].iloc[-1] < plain["eval_loss"].iloc[0] - 0.1  # it trained


@pytest.mark.slow
def test_the_issues_example_ends_within_1e_3_of_fedavg(tmp_path):
    """Issue #22's set-up as written (the default-run test above is its smaller copy); measured:
    1.86560701 without and 1.86560713 with secure aggregation (2.548 before the fix)."""
    common = ["data=synthetic", "data.num_clients=100", "model=logreg", "rounds=20", "sampler.kind=poisson",
              "sampler.clients_per_round=10", "seed=3", "device=cpu"]
    final = {}
    for privacy in ("none", "secure_agg"):
        _, summary = train.train(config.build(config.compose([*common, f"privacy={privacy}",
                                                              f"run_dir={tmp_path / privacy}"])))
        final[privacy] = summary["final"]["eval_loss"]
    assert abs(final["secure_agg"] - final["none"]) < 1e-3 * final["none"]


def test_scaffold_with_and_without_secure_aggregation_end_at_the_same_model(tmp_path):
    """SCAFFOLD's mean of dy_i and sum of dc_i both come out of the masked vector; c_i stays client-side."""
    common = [*SYNTHETIC, "rounds=4", "strategy=scaffold", "client.optimizer=sgd", "client.lr=0.1", "seed=2"]
    states = {}
    for privacy in ("none", "secure_agg"):
        run_dir, _ = train.train(config.build(config.compose(
            [*common, f"privacy={privacy}", f"run_dir={tmp_path / privacy}"])))
        states[privacy] = (pd.read_csv(run_dir / "metrics.csv")["eval_loss"],
                           torch.load(run_dir / "checkpoints" / "round_0004.pt", weights_only=True)["strategy"])
    np.testing.assert_allclose(states["secure_agg"][0], states["none"][0], rtol=1e-5)
    plain, secure = states["none"][1], states["secure_agg"][1]
    torch.testing.assert_close(secure["control"], plain["control"], rtol=0, atol=1e-6)
    assert secure["client_controls"].keys() == plain["client_controls"].keys() and len(plain["client_controls"]) > 6


def test_tiny_gpt_with_and_without_secure_aggregation_end_at_the_same_model(compose_cfg, tmp_path):
    common = ["rounds=3", "sampler.clients_per_round=4", "sampler.dropout=0.25", "seed=1"]
    losses = {}
    for privacy in ("none", "secure_agg"):
        run_dir, summary = train.train(config.build(compose_cfg(*common, f"privacy={privacy}",
                                                                f"run_dir={tmp_path / privacy}")))
        losses[privacy] = pd.read_csv(run_dir / "metrics.csv")["eval_loss"]
    np.testing.assert_allclose(losses["secure_agg"], losses["none"], rtol=1e-5)


def test_clients_csv_holds_only_what_the_server_sees_unless_asked(tmp_path):
    base = [*SYNTHETIC, "rounds=1", "privacy=secure_agg"]
    hidden, _ = train.train(config.build(config.compose([*base, f"run_dir={tmp_path / 'hidden'}"])))
    shown, _ = train.train(config.build(config.compose([*base, "privacy.log_client_stats=true",
                                                        f"run_dir={tmp_path / 'shown'}"])))
    h, s = pd.read_csv(hidden / "clients.csv"), pd.read_csv(shown / "clients.csv")
    for column in ("examples", "train_loss", "local_steps"):
        assert h[column].isna().all() and s[column].notna().all()
    assert h["status"].eq("ok").all() and len(h) == 6


def test_a_poisson_round_below_the_minimum_keeps_the_model(tmp_path):
    run_dir, summary = train.train(config.build(config.compose(
        [*SYNTHETIC, "rounds=8", "sampler.kind=poisson", "sampler.clients_per_round=3", "privacy=secure_agg",
         f"run_dir={tmp_path / 'run'}"])))
    m = pd.read_csv(run_dir / "metrics.csv")
    skipped = m.index[m["secagg_skipped"] == 1]
    assert len(skipped) > 0 and summary["privacy"]["skipped_rounds"] == len(skipped)
    assert (m.loc[skipped, "sampled"] < 3).all()
    for i in skipped:
        assert m.loc[i, "eval_loss"] == m.loc[i - 1, "eval_loss"]


def test_a_min_cohort_larger_than_every_round_is_refused():
    with pytest.raises(FedrunError, match="privacy.secagg_min_clients: 5 is more than the 4 clients"):
        config.compose(["privacy=secure_agg", "sampler.clients_per_round=4", "privacy.secagg_min_clients=5"])
    with pytest.raises(FedrunError, match="privacy.secagg_min_clients: 1 is not allowed"):
        config.compose(["privacy=secure_agg", "privacy.secagg_min_clients=1"])


# ---- central DP over secure aggregation -------------------------------------------------------

def _central(**kw):
    return central_mechanism(**kw)


def test_the_adaptive_clipping_bit_is_summed_inside_the_masked_vector():
    ctx = RoundContext(round_idx=2, seed=0, num_clients=1000, cohort=[0, 1, 2, 3, 4])
    scales = (0.01, 0.05, 1.0, 2.0, 3.0)  # two of five fit under C = 1
    outcomes = []
    for secure in (False, True):
        mech = _central(secure_agg=secure)
        mech.begin_round(ctx)
        g = torch.Generator().manual_seed(0)
        sent = [mech.on_client(ClientUpdate(client_id=i, delta=torch.randn(40, generator=g) * s / 6, num_examples=3,
                                            train_loss=0.0, seconds=0.0, bytes_up=160), ctx)
                for i, s in enumerate(scales)]
        if secure:
            assert all("unclipped" not in u.extras and u.delta.dtype == torch.uint32 for u in sent)
        mech.aggregate(sent, ctx, FedAvg())
        outcomes.append(mech.clip_norm)
    assert outcomes[0] == outcomes[1] != 1.0  # the same count, read from the secure sum


def _simulated_flip_rate(*, n_pop, q, p, m, frac, trials, seed=0):
    """Monte Carlo: how often adding one user changes whether the round is aggregated."""
    rng = np.random.default_rng(seed)
    others = rng.binomial(n_pop - 1, q, size=trials)
    survivors = rng.binomial(others, 1 - p)
    u_in, u_survives = rng.random(trials) < q, rng.random(trials) >= p

    def agg(n, s):
        t = np.maximum(2, np.ceil(frac * n))
        return (n >= m) & (s >= t)

    with_u = agg(others + u_in, survivors + (u_in & u_survives))
    return float(np.mean(with_u != agg(others, survivors)))


@pytest.mark.parametrize("q, p, m, frac", [(0.05, 0.0, 3, 0.5), (0.08, 0.2, 3, 0.5), (0.1, 0.3, 4, 0.8)])
def test_the_skip_flip_probability_matches_a_simulation(q, p, m, frac):
    gamma = flip_probability(num_clients=60, sample_rate=q, dropout=p, min_clients=m, threshold_fraction=frac,
                             bits=16)
    simulated = _simulated_flip_rate(n_pop=60, q=q, p=p, m=m, frac=frac, trials=2_000_000)
    assert gamma > 1e-4 and abs(gamma - simulated) < 5 * math.sqrt(gamma / 2_000_000) + 1e-6
    if p == 0:  # closed form: the others' cohort must be exactly m - 1 (t(n) <= n for n >= 2)
        assert gamma == pytest.approx(q * binom.pmf(m - 1, 59, q), rel=1e-9)


def test_epsilon_with_skips_is_a_valid_certificate():
    rdp = lambda d: math.sqrt(2 * math.log(1.25 / d)) * 2.0  # any decreasing epsilon(delta) will do  # noqa: E731
    gamma, delta = 1e-10, 1e-5  # e^eps gamma ~ 2e-6 at eps ~ 9.8
    eps = epsilon_with_skips(rdp, delta=delta, gamma=gamma)
    # there is a delta_acc at which the accountant gives eps, and delta_acc + e^eps gamma <= delta
    lo, hi = 1e-12, delta
    for _ in range(200):  # invert the accountant by bisection
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rdp(mid) > eps else (lo, mid)
    assert hi + math.exp(eps) * gamma <= delta * (1 + 1e-9)
    assert eps > rdp(delta)  # skipping costs something
    assert epsilon_with_skips(rdp, delta=delta, gamma=delta) == math.inf


def test_dp_over_secure_aggregation_charges_skipped_rounds_or_refuses():
    small = _central(secure_agg=True, num_clients=150, sample_rate=15 / 150, delta=1e-3, rounds=50)
    assert small.skip_gamma == pytest.approx(0.1 * binom.pmf(2, 149, 0.1))
    small.ledger.record(small._event(RoundContext(round_idx=1, seed=0, num_clients=150), participants=10))
    plain = _central(secure_agg=False, num_clients=150, sample_rate=15 / 150, delta=1e-3, rounds=50)
    plain.ledger.record(plain._event(RoundContext(round_idx=1, seed=0, num_clients=150), participants=10))
    assert small.round_metrics(tight=False)["epsilon"] > plain.round_metrics(tight=False)["epsilon"]
    with pytest.raises(FedrunError, match="privacy.secagg_min_clients: with an expected cohort of 10 of 150"):
        _central(secure_agg=True, num_clients=150, sample_rate=10 / 150, delta=1e-3, rounds=50)


def test_os_noise_is_fresh_and_seed_noise_repeats():
    ctx = RoundContext(round_idx=3, seed=0, num_clients=1000, cohort=[0])
    zero = [ClientUpdate(client_id=0, delta=torch.zeros(40), num_examples=1, train_loss=0.0, seconds=0.0, bytes_up=0)]

    def noise(source):
        return _central(adaptive=False, noise_source=source).aggregate(list(zero), ctx, FedAvg())

    assert torch.equal(noise("seed"), noise("seed"))
    assert not torch.equal(noise("os"), noise("os"))
