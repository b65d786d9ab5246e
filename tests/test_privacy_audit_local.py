"""privacy=local_dp and audit=canaries through the round loop."""

import pandas as pd
import pytest

from fedrun import config, train
from fedrun.privacy.local_dp import client_epsilon


def test_local_dp_reports_the_worst_clients_epsilon_from_its_own_steps(compose_cfg, tmp_path):
    run_dir, summary = train.train(config.build(compose_cfg(
        "privacy=local_dp", "privacy.noise_multiplier=1.5", "rounds=3", "eval_every=3", "client.batch_size=8",
        "client.local_steps=4", f"run_dir={tmp_path / 'ldp'}")))
    clients = pd.read_csv(run_dir / "clients.csv")
    sizes = clients.groupby("client_id")["examples"].first()
    steps = clients.groupby("client_id")["local_steps"].sum()
    # Each client's epsilon, from opacus via the DP-SGD module, independently of the mechanism.
    eps = {c: client_epsilon(noise_multiplier=1.5, sample_rate=min(1.0, 8 / sizes[c]), steps=int(steps[c]),
                             delta=1e-5, accountant="rdp") for c in steps.index}
    worst = max(eps, key=eps.get)
    m = pd.read_csv(run_dir / "metrics.csv")
    assert m["epsilon"].iloc[-1] == pytest.approx(eps[worst], rel=1e-9)
    assert eps[summary["privacy"]["worst_client"]] == eps[worst]  # (ties between clients are possible)
    assert summary["privacy"]["level"] == "example"
    assert m["epsilon_prv"].iloc[-1] <= m["epsilon_rdp"].iloc[-1]
    assert m["eval_loss"].notna().sum() == 2


def test_canaries_are_planted_in_training_text_and_their_exposure_reported(compose_cfg, tmp_path):
    run_dir, summary = train.train(config.build(compose_cfg(
        "audit=canaries", "audit.num_canaries=2", "audit.repeats=3", "audit.num_references=50", "rounds=2",
        "eval_every=1", "data.seq_len=32", f"run_dir={tmp_path / 'audit'}")))
    audit = summary["audit"]
    assert len(audit["exposures"]) == 2 and all(0 <= e <= audit["max_exposure"] for e in audit["exposures"])
    assert audit["max_exposure"] == pytest.approx(__import__("math").log2(51))
    m = pd.read_csv(run_dir / "metrics.csv")
    assert m["canary_exposure"].notna().all()
    assert m["canary_exposure"].iloc[-1] == pytest.approx(sum(audit["exposures"]) / 2)


def test_canaries_need_text_data():
    from fedrun.core import FedrunError

    with pytest.raises(FedrunError, match="audit: canaries are byte-level secrets planted in text"):
        config.build(config.compose(["data=synthetic", "model=logreg", "audit=canaries"]))
