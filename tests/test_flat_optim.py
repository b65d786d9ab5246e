"""The flat optimizers against torch.optim (an independent implementation), row by row."""
import pytest
import torch
from torch import nn

from fedrun.client import ClientConfig, LocalTrainer, batch_indices
from fedrun.core import ClientJob, RoundContext, Stream, torch_generator
from fedrun.data.examples import ClientData, Labelled
from fedrun.flat_optim import FlatAdam, FlatSGD, descend


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_flat_optimizers_match_torch_optim_row_by_row(kind):
    g = torch.Generator().manual_seed(0)
    active = [4, 4, 3, 3, 1]  # rows train 5, 4, 4 and 2 steps; a finished row must not move
    init = torch.randn(4, 7, generator=g)
    grads = torch.randn(len(active), 4, 7, generator=g)
    stack = init.clone()
    if kind == "sgd":
        options = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
        stacked, reference = FlatSGD(stack, **options), torch.optim.SGD
    else:
        options = {"lr": 0.01, "weight_decay": 0.01}
        stacked, reference = FlatAdam(stack, **options), torch.optim.Adam
    for s, a in enumerate(active):
        stacked.step(stack, grads[s, :a].clone(), active=a, step=s)
    for k in range(4):
        p = nn.Parameter(init[k].clone())
        optimizer = reference([p], **options)
        for s, a in enumerate(active):
            if k < a:
                p.grad = grads[s, k].clone()
                optimizer.step()
        torch.testing.assert_close(stack[k], p.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(stack[k], init[k])


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_reset_forgets_the_state_as_a_new_optimizer_would(kind):
    g = torch.Generator().manual_seed(1)
    init, grads = torch.randn(1, 5, generator=g), torch.randn(3, 1, 5, generator=g)
    make = (lambda s: FlatSGD(s, lr=0.1, momentum=0.9)) if kind == "sgd" else (lambda s: FlatAdam(s, lr=0.1))
    used, fresh = init.clone(), init.clone()
    optimizer = make(used)
    for s in range(3):
        optimizer.step(used, grads[s].clone(), active=1, step=s)
    used.copy_(init)
    optimizer.reset()
    other = make(fresh)
    for s in range(3):
        optimizer.step(used, grads[s].clone(), active=1, step=s)
        other.step(fresh, grads[s].clone(), active=1, step=s)
    assert torch.equal(used, fresh)


def test_descend_adds_the_local_rules_term_to_the_active_rows_before_the_step():
    # w' = w - lr * (g + 2 w) for the active row; the finished second row is left as it was
    w = torch.tensor([[1.0, -2.0], [5.0, 5.0]])
    g = torch.tensor([[0.25, 1.0]])
    seen = []
    descend(FlatSGD(w, lr=0.5), w, g, active=1, step=0,
            term=lambda grad, rows: seen.append(rows.shape) or grad.add_(2.0 * rows))
    torch.testing.assert_close(w, torch.tensor([[1.0 - 0.5 * (0.25 + 2.0), -2.0 - 0.5 * (1.0 - 4.0)], [5.0, 5.0]]))
    assert seen == [(1, 2)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_local_training_equals_a_torch_optim_loop(optimizer):
    """A client's local training (flat buffers, functional optimizer, per-epoch batch gathers)
    against a plain loop: its own model, torch.optim, one index per batch."""
    g = torch.Generator().manual_seed(2)
    data = ClientData("c", Labelled(torch.randn(23, 6, generator=g), torch.randint(0, 3, (23,), generator=g)),
                      Labelled(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)))
    cfg = ClientConfig(optimizer=optimizer, lr=0.05, momentum=0.9 if optimizer == "sgd" else 0.0,
                       weight_decay=0.01, batch_size=5, local_epochs=None, local_steps=11)

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    trainer = LocalTrainer(make_model, cfg, torch.device("cpu"))
    weights = trainer.flat.detach().clone()
    ctx = RoundContext(round_idx=3, seed=7, num_clients=1)
    update = trainer.train(ClientJob(0), data, weights, ctx)

    model = make_model()
    reference = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01) if optimizer == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01))
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    order = torch_generator(7, Stream.CLIENT, 3, 0)
    steps = cfg.num_steps(23, order)
    for idx in batch_indices(23, 5, steps, order):
        reference.zero_grad()
        nn.functional.cross_entropy(model(data.train.features[idx]), data.train.labels[idx]).backward()
        reference.step()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert update.num_steps == 11
    torch.testing.assert_close(update.delta, after - before, rtol=1e-5, atol=1e-6)
