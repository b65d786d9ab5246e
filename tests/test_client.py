"""Local training: isolation between clients and the global model, and the client's step count."""
import torch

from fedrun import config
from fedrun.client import ClientConfig, batch_indices
from fedrun.core import ClientJob, RoundContext
from fedrun.server_model import initial_model


def test_training_a_client_never_touches_global_or_other_clients_tensors(compose_cfg):
    exp = config.build(compose_cfg("sampler.clients_per_round=2"))
    global_model, global_flat = initial_model(exp.make_model, exp.device, exp.cfg.seed)
    weights = global_flat.detach().clone()
    global_params = [p.detach().clone() for p in global_model.parameters()]
    trainer = exp.backend.trainer
    ctx = RoundContext(round_idx=1, seed=0, num_clients=exp.data.num_clients)
    first = trainer.train(ClientJob(0), exp.data.clients[0], weights, ctx)
    first_delta = first.delta.clone()
    second = trainer.train(ClientJob(1), exp.data.clients[1], weights, ctx)
    # The global weights and model are untouched, and the first client's update survives the second.
    torch.testing.assert_close(weights, global_flat, rtol=0, atol=0)
    for p, q in zip(global_model.parameters(), global_params):
        assert torch.equal(p.detach(), q)
    assert torch.equal(first.delta, first_delta)
    assert first.delta.norm() > 0 and second.delta.norm() > 0
    # No storage is shared between the trainer's model, the global model and the updates.
    storages = {t.untyped_storage().data_ptr() for t in (trainer.flat, global_flat, weights, first.delta, second.delta)}
    assert len(storages) == 5
    assert not set(map(id, trainer.model.parameters())) & set(map(id, global_model.parameters()))


def test_same_client_same_round_gives_the_same_update(compose_cfg):
    exp = config.build(compose_cfg())
    _, flat = initial_model(exp.make_model, exp.device, exp.cfg.seed)
    ctx = RoundContext(round_idx=4, seed=0, num_clients=exp.data.num_clients)
    trainer = exp.backend.trainer
    a = trainer.train(ClientJob(2), exp.data.clients[2], flat, ctx)
    trainer.train(ClientJob(0), exp.data.clients[0], flat, ctx)  # another client in between changes nothing
    b = trainer.train(ClientJob(2), exp.data.clients[2], flat, ctx)
    assert torch.equal(a.delta, b.delta)


def test_local_epochs_visit_every_example_once_per_epoch():
    g = torch.Generator().manual_seed(0)
    cfg = ClientConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0, batch_size=4,
                       local_epochs=2, local_steps=None)
    steps = cfg.num_steps(10, g)
    assert steps == 2 * 3
    batches = list(batch_indices(10, 4, steps, g))
    assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(10))
    assert sorted(torch.cat(batches[3:]).tolist()) == list(range(10))


def test_local_steps_cycle_through_epochs():
    g = torch.Generator().manual_seed(0)
    batches = list(batch_indices(5, 2, 7, g))
    assert len(batches) == 7
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(5))
