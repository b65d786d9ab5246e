"""StackedModel: K clients' losses and gradients in one batched call, against plain autograd
on one model per client (an independent computation), by grouped matmuls and by vmap."""
import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedrun import config
from fedrun.backends.stacked_model import StackedModel, groupable
from fedrun.client import attach_flat_grads
from fedrun.models.small import MLP, LogReg
from fedrun.models.tiny_gpt import TinyGPT
from fedrun.params import flatten_parameters


class Branchy(nn.Module):
    """A linear layer, then Python control flow on a value: not elementwise in the clients."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        out = self.linear(x)
        return out if out.sum() > 0 else -out


@pytest.mark.parametrize("model, expected", [
    (LogReg(num_features=6, num_classes=3), True),
    (MLP(num_features=6, num_classes=3, hidden=8), True),
    (nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)), True),
    (Branchy(), False),
    (TinyGPT(vocab_size=16, seq_len=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0), False),
])
def test_only_linear_and_elementwise_models_are_grouped(model, expected):
    assert groupable(model) is expected


def _reference(make_model, rows, x, y, sizes):
    """Each row's gradient and loss from its own model, on its real examples alone."""
    grads, losses = [], []
    for row, xk, yk, n in zip(rows, x, y, sizes):
        model = make_model()
        torch.nn.utils.vector_to_parameters(row, [p for p in model.parameters() if p.requires_grad])
        loss = F.cross_entropy(model(xk[:n]), yk[:n])
        loss.backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]))
        losses.append(loss.detach())
    return torch.stack(grads), torch.stack(losses)


@pytest.mark.parametrize("mode", ["grouped", "grouped-untraced", "vmap"])
@pytest.mark.parametrize("k", [2, 5])
def test_rows_get_their_own_clients_gradients_and_losses(mode, k):
    torch.manual_seed(0)

    def make_model():
        return MLP(num_features=6, num_classes=3, hidden=8)

    model = make_model()
    flat = flatten_parameters(model)
    stacked = StackedModel(model, flat=flat, flat_grad=attach_flat_grads(model, flat))
    assert stacked._traced is not None  # an MLP traces: its linear layers become grouped matmuls
    if mode != "grouped":  # the per-op mode that runs groupable models torch.fx cannot trace, or vmap
        stacked.mode, stacked._traced = mode.removesuffix("-untraced"), None
    rows = flat.detach() + 0.3 * torch.randn(k, flat.numel())  # every client has its own weights
    x, y = torch.randn(k, 4, 6), torch.randint(0, 3, (k, 4))
    sizes = [4, 3, 4, 1, 2][:k]  # short batches padded to 4
    share = torch.tensor([[1.0 / n if b < n else 0.0 for b in range(4)] for n in sizes])
    grads, losses = stacked.gradients(rows, x, y, share)
    want_grads, want_losses = _reference(make_model, rows, x, y, sizes)
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
    assert stacked.vmapped is (k >= {"grouped": 2, "vmap": 4}[stacked.mode])  # else row by row on the plain model
    again, _ = stacked.gradients(rows, x, y, share)  # the buffer is zeroed, not accumulated into
    torch.testing.assert_close(again, want_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, mode", [("logreg", "grouped"), ("mlp", "grouped"), ("tiny_gpt", "vmap")])
def test_the_backend_groups_small_classifiers_and_vmaps_the_rest(compose_cfg, tmp_path, caplog, model, mode):
    if model == "tiny_gpt":
        cfg = compose_cfg("backend=vectorized", f"model={model}")
    else:
        cfg = config.compose([f"run_dir={tmp_path / 'run'}", "device=cpu", "data=synthetic", "data.num_clients=4",
                              "sampler.clients_per_round=4", f"model={model}", "backend=vectorized"])
    with caplog.at_level(logging.INFO):
        exp = config.build(cfg)
    assert exp.backend.stacked.mode == mode
    assert (exp.backend.stacked._traced is not None) is (mode == "grouped")
    # On a CPU, vmap is usually slower than sequential training: the user is told, once, when
    # training starts (the run's train.log is attached after the build).
    from fedrun.core import RoundContext

    ctx = RoundContext(round_idx=1, seed=0, num_clients=4)
    with caplog.at_level(logging.INFO):
        for _ in range(2):
            exp.backend.train_cohort(exp.server_model.initial_weights(), [], ctx)
    told = [r for r in caplog.records if "usually slower than backend=sequential" in r.getMessage()]
    assert len(told) == (mode == "vmap")


class Frozen(nn.Module):
    """A groupable model whose first layer is frozen: its weights are not in the stack."""

    elementwise_forward = True

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        self.net[0].requires_grad_(False)

    def forward(self, x):
        return self.net(x)


def test_a_frozen_layer_is_run_by_the_per_op_mode_with_the_models_own_weights():
    torch.manual_seed(0)
    model = Frozen()
    flat = flatten_parameters(model)
    stacked = StackedModel(model, flat=flat, flat_grad=attach_flat_grads(model, flat))
    assert stacked.mode == "grouped" and stacked._traced is None
    rows = flat.detach() + 0.3 * torch.randn(3, flat.numel())
    x, y = torch.randn(3, 4, 6), torch.randint(0, 3, (3, 4))
    grads, losses = stacked.gradients(rows, x, y, torch.full((3, 4), 0.25))
    want_grads, want_losses = _reference(lambda: copy.deepcopy(model), rows, x, y, [4, 4, 4])  # the same frozen layer
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6)
