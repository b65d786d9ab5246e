import torch

from fedrun.attacks import ModelPoisoning
from fedrun.core import ClientUpdate, RoundContext


def _update(cid, delta):
    return ClientUpdate(client_id=cid, delta=delta, num_examples=1, train_loss=0.0, seconds=0.0, bytes_up=0)


def test_malicious_set_is_a_fixed_seeded_fraction_of_the_population():
    a = ModelPoisoning(kind="sign_flip", fraction=0.2, scale=1.0, num_clients=50, seed=3)
    b = ModelPoisoning(kind="sign_flip", fraction=0.2, scale=1.0, num_clients=50, seed=3)
    c = ModelPoisoning(kind="sign_flip", fraction=0.2, scale=1.0, num_clients=50, seed=4)
    assert len(a.malicious) == 10 and a.malicious == b.malicious != c.malicious


def test_each_attack_replaces_only_malicious_updates():
    ctx = RoundContext(round_idx=1, seed=0, num_clients=10)
    delta = torch.arange(4.0)
    for kind, expected in [("sign_flip", -2 * delta), ("scale", 2 * delta)]:
        attack = ModelPoisoning(kind=kind, fraction=0.5, scale=2.0, num_clients=10, seed=0)
        bad, good = min(attack.malicious), min(set(range(10)) - attack.malicious)
        assert torch.equal(attack.on_client(_update(bad, delta.clone()), ctx).delta, expected)
        honest = attack.on_client(_update(good, delta.clone()), ctx)
        assert torch.equal(honest.delta, delta) and not honest.malicious
    attack = ModelPoisoning(kind="gaussian", fraction=1.0, scale=3.0, num_clients=10, seed=0)
    noise = attack.on_client(_update(0, torch.zeros(20000)), ctx)
    assert noise.malicious and abs(float(noise.delta.std()) - 3.0) < 0.1


def test_out_of_range_keys_are_refused_by_the_signature():
    import pytest
    from omegaconf import OmegaConf

    from fedrun.components import check_values
    from fedrun.core import FedrunError

    cases = {"kind": ("flip", "attack.kind: 'flip' is not allowed; allowed: one of sign_flip, scale, gaussian"),
             "fraction": (1.5, "attack.fraction: 1.5 is not allowed; allowed: a number in [0, 1]"),
             "scale": (-1.0, "attack.scale: -1.0 is not allowed; allowed: a finite number >= 0")}
    for key, (value, message) in cases.items():
        node = OmegaConf.create({"kind": "scale", "fraction": 0.2, "scale": 1.0, key: value})
        with pytest.raises(FedrunError) as e:
            check_values(node, ModelPoisoning, "attack", "attack")
        assert str(e.value) == message
