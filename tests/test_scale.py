"""Population scale: packed client data, the per-client cap, per-round work that does not grow
with the population, and the recorded time to first round. Structure only, never seconds."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedrun import config
from fedrun import train as training
from fedrun.core import FedrunError
from fedrun.data import synthetic as syn
from fedrun.data.examples import ClientData, FederatedData, PackedClients, Windows, pack

OPTIONS = dict(alpha=1.0, beta=1.0, num_clients=40, num_features=5, num_classes=4, iid=False,
               partition="natural", dirichlet_alpha=0.5, size_skew=0.0, test_fraction=0.0,
               max_client_examples=None, seed=0)


def _data(**kw) -> FederatedData:
    keys = OPTIONS | kw
    seed = keys.pop("seed")
    return syn.Synthetic(**keys).load(seed=seed)


def test_the_cap_keeps_each_capped_clients_first_examples_and_leaves_the_others_alone():
    full, capped = _data(), _data(max_client_examples=80)
    sizes = full.client_sizes()
    assert sizes.max() > 80 and sizes.min() < 80  # FedProx's sizes: some clients above the cap
    np.testing.assert_array_equal(capped.client_sizes(), np.minimum(sizes, 80))
    for a, b in zip(full.clients, capped.clients):
        n = len(b.train)
        assert torch.equal(a.train.features[:n], b.train.features)
        assert torch.equal(a.train.labels[:n], b.train.labels)
    assert capped.fingerprint["max_client_examples"] == 80 and "max_client_examples" not in full.fingerprint


def test_capped_clients_still_hold_out_their_last_examples_for_test():
    data = _data(max_client_examples=60, test_fraction=0.2)
    for c in data.clients:
        assert len(c.train) + len(c.test) <= 60 and len(c.test) == max(1, int((len(c.train) + len(c.test)) * 0.2))


def test_a_cap_below_one_is_a_user_error():
    from omegaconf import OmegaConf

    from fedrun.components import check_values

    keys = {k: v for k, v in OPTIONS.items() if k != "seed"} | {"max_client_examples": 0, "test_fraction": 0.2}
    with pytest.raises(FedrunError, match="data.max_client_examples"):
        check_values(OmegaConf.create(keys), syn.Synthetic, "data", "data")


def test_clients_are_views_into_one_tensor_per_split():
    data = _data(num_clients=300, max_client_examples=20, test_fraction=0.2)
    packed = data.clients
    assert isinstance(packed, PackedClients)
    storages = {t.untyped_storage().data_ptr() for t in (packed.train.features, packed.train.labels,
                                                         packed.test.features, packed.test.labels)}
    for c in (packed[0], packed[150], packed[-1]):
        for t in (c.train.features, c.train.labels, c.test.features, c.test.labels):
            assert t.untyped_storage().data_ptr() in storages  # a view, not a copy
    assert data.test_examples() is packed.test  # the evaluation set is the test pack, not a concat
    assert packed[-1].name == "synthetic_299" and len(packed) == 300
    with pytest.raises(IndexError):
        packed[300]


def test_pack_keeps_order_names_and_examples_of_separate_clients():
    clients = [ClientData(f"c{k}", Windows(torch.full((k + 1, 3), k, dtype=torch.uint8)),
                          Windows(torch.full((k % 2, 3), 10 + k, dtype=torch.uint8))) for k in range(5)]
    packed = pack(clients)
    assert [c.name for c in packed] == [c.name for c in clients]
    for a, b in zip(clients, packed):
        assert torch.equal(a.train.tokens, b.train.tokens) and torch.equal(a.test.tokens, b.test.tokens)
    plain, packed_data = FederatedData(clients, {}), FederatedData(packed, {})
    np.testing.assert_array_equal(plain.client_sizes(), packed_data.client_sizes())
    assert torch.equal(plain.test_examples().tokens, packed_data.test_examples().tokens)


def test_repartitioned_synthetic_data_is_packed_and_keeps_every_example():
    natural, shards = _data(test_fraction=0.2), _data(test_fraction=0.2, partition="shards")
    assert isinstance(shards.clients, PackedClients) and shards.num_clients == 40

    def every(d):
        return torch.cat([d.clients.train.labels, d.clients.test.labels]).sort().values

    assert torch.equal(every(natural), every(shards))


def _run_counting_client_reads(tmp_path, monkeypatch, num_clients: int) -> list[int]:
    """Clients read from the data in each round of a short run over `num_clients` clients."""
    reads = []
    original = PackedClients.__getitem__
    monkeypatch.setattr(PackedClients, "__getitem__", lambda self, k: reads.append(k) or original(self, k))
    cfg = config.compose([f"run_dir={tmp_path / f'run{num_clients}'}", "device=cpu", "data=synthetic", "model=logreg",
                          f"data.num_clients={num_clients}", "data.max_client_examples=20", "data.num_features=4",
                          "sampler.clients_per_round=5", "client.local_steps=1", "rounds=4", "eval_every=100"])
    per_round, seen = [], [0]

    def on_round(row):
        per_round.append(len(reads) - seen[0])
        seen[0] = len(reads)

    training.train(config.build(cfg), on_round=on_round)
    return per_round[1:]  # round 0 is the initial evaluation, after the one-off set-up


def test_a_rounds_client_reads_do_not_depend_on_the_population(tmp_path, monkeypatch):
    small = _run_counting_client_reads(tmp_path, monkeypatch, 100)
    large = _run_counting_client_reads(tmp_path, monkeypatch, 3000)
    assert small == large == [5, 5, 5, 5]  # the cohort's clients, each once


def test_summary_and_log_record_the_time_to_first_round(compose_cfg):
    exp = config.build(compose_cfg("rounds=1"))
    run_dir, summary = training.train(exp)
    with open(run_dir / "partition.csv") as f:  # written from the offsets, without the clients' views
        rows = [(r["name"], int(r["train_examples"]), int(r["test_examples"])) for r in csv.DictReader(f)]
    assert rows == [(c.name, len(c.train), len(c.test)) for c in exp.data.clients]
    written = json.loads((run_dir / "summary.json").read_text())
    parts = written["startup"]
    assert set(parts) == {"imports", "data", "build", "initial_eval", "data_cache"}
    assert parts["data_cache"] == "miss"
    assert all(parts[k] >= 0 for k in ("imports", "data", "build", "initial_eval"))
    total = sum(parts[k] for k in ("imports", "data", "build", "initial_eval"))
    assert written["startup_seconds"] == pytest.approx(total, abs=0.01)
    assert "startup:" in (run_dir / "train.log").read_text()


HEAVY = ["transformers", "peft", "matplotlib", "pandas", "mlflow", "tensorboard", "opacus", "scipy", "ray"]


def test_the_cli_and_a_plain_train_import_no_heavy_optional_module():
    code = ("import sys, fedrun.cli; from fedrun import config, train; "
            "config.build(config.compose(['data=synthetic', 'model=logreg', 'data.num_clients=4', "
            "'sampler.clients_per_round=2', 'data.cache=false'])); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
