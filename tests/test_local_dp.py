"""Example-level DP-SGD: per-example gradients against a loop of single-example backward passes,
clipping against the closed form, noise statistics, Poisson batches, and epsilon against opacus
and against a numpy transcription of RDP for the Gaussian mechanism."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn

from fedrun.client import attach_flat_grads
from fedrun.core import FedrunError
from fedrun.evaluation import batch_loss
from fedrun.models.lstm import CharLSTM
from fedrun.models.small import MLP, LogReg
from fedrun.models.tiny_gpt import TinyGPT
from fedrun.params import flatten_parameters
from fedrun.privacy.local_dp import DPSGDStep, client_epsilon, poisson_batches

# On CPU nn.LSTM runs under vmap through torch's per-example fallback, which says so once.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def flat_model(make):
    """A model set up as LocalTrainer sets it up: weights and gradients are views into flat buffers."""
    torch.manual_seed(0)
    model = make()
    flat = flatten_parameters(model)
    return model, flat, attach_flat_grads(model, flat)


def mlp():
    return MLP(num_features=6, num_classes=3, hidden=5)


def gpt():
    return TinyGPT(vocab_size=11, seq_len=8, n_layer=1, n_head=2, n_embd=8, dropout=0.0)


def lstm():
    return CharLSTM(vocab_size=7, seq_len=5, embed_dim=3, hidden_size=4, num_layers=2)


def logreg():
    return LogReg(num_features=6, num_classes=3)


def batch(make, size: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    if make in (mlp, logreg):
        return torch.randn(size, 6, generator=g), torch.randint(0, 3, (size,), generator=g)
    vocab, seq = (11, 8) if make is gpt else (7, 5)
    tokens = torch.randint(0, vocab, (size, seq + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def loop_gradients(model, flat_grad, x, y) -> torch.Tensor:
    """(B, D): each example's flat gradient from its own backward pass."""
    rows = []
    for i in range(len(x)):
        flat_grad.zero_()
        batch_loss(model, x[i : i + 1], y[i : i + 1]).backward()
        rows.append(flat_grad.clone())
    return torch.stack(rows)


def noise_free(model, x, y, flat_grad, *, clip: float, expected: int) -> torch.Tensor:
    step = DPSGDStep(model, max_grad_norm=clip, noise_multiplier=0.0)
    step.compute(x, y, flat_grad=flat_grad, generator=torch.Generator(), expected_batch_size=expected)
    return flat_grad.clone()


@pytest.mark.parametrize("make", [mlp, gpt, lstm, logreg])
def test_per_example_gradients_equal_a_loop_of_single_example_backward_passes(make):
    model, _, flat_grad = flat_model(make)
    x, y = batch(make, 4)
    step = DPSGDStep(model, max_grad_norm=1.0, noise_multiplier=0.0)
    grads, losses = step.per_example_gradients(x, y)
    flat_rows = torch.cat([grads[name].reshape(len(x), n) for name, _, n in step.layout], dim=1)
    torch.testing.assert_close(flat_rows, loop_gradients(model, flat_grad, x, y), atol=1e-5, rtol=0)
    expected_losses = [float(batch_loss(model, x[i : i + 1], y[i : i + 1]).detach()) for i in range(len(x))]
    torch.testing.assert_close(losses, torch.tensor(expected_losses), atol=1e-6, rtol=0)


@pytest.mark.parametrize("make", [mlp, gpt])
def test_noiseless_step_is_the_sum_of_closed_form_clipped_gradients_over_the_expected_batch(make):
    model, _, flat_grad = flat_model(make)
    x, y = batch(make, 6)
    per_example = loop_gradients(model, flat_grad, x, y)
    norms = per_example.norm(dim=1)
    clip = float(norms.median())  # some examples clipped, some not
    scale = torch.minimum(torch.ones_like(norms), clip / norms)
    want = (scale[:, None] * per_example).sum(0) / 10
    got = noise_free(model, x, y, flat_grad, clip=clip, expected=10)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (scale < 1).any() and (scale == 1).any()


def test_the_result_is_the_parameters_grad_so_the_optimizer_steps_on_it():
    model, flat, flat_grad = flat_model(mlp)
    x, y = batch(mlp, 5)
    step = DPSGDStep(model, max_grad_norm=0.5, noise_multiplier=1.0)
    loss = step.compute(x, y, flat_grad=flat_grad, generator=torch.Generator().manual_seed(3),
                        expected_batch_size=5)
    assert loss == pytest.approx(float(batch_loss(model, x, y).detach()), abs=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), flat_grad)
    before = flat.clone()
    torch.optim.SGD(params, lr=0.1).step()
    torch.testing.assert_close(flat, before - 0.1 * flat_grad)


def test_physical_batches_do_not_change_the_result():
    model, _, flat_grad = flat_model(gpt)
    x, y = batch(gpt, 7)
    whole = noise_free(model, x, y, flat_grad, clip=0.05, expected=7)
    step = DPSGDStep(model, max_grad_norm=0.05, noise_multiplier=0.0, max_physical_batch=3)
    step.compute(x, y, flat_grad=flat_grad, generator=torch.Generator(), expected_batch_size=7)
    torch.testing.assert_close(flat_grad, whole, atol=1e-7, rtol=1e-5)


def test_noise_has_std_z_c_over_expected_batch_and_is_reproducible_from_the_generator():
    model, _, flat_grad = flat_model(lambda: MLP(num_features=60, num_classes=10, hidden=100))
    x, y = torch.randn(4, 60), torch.randint(0, 10, (4,))
    clip, z, expected = 0.7, 1.3, 8
    base = noise_free(model, x, y, flat_grad, clip=clip, expected=expected)
    step = DPSGDStep(model, max_grad_norm=clip, noise_multiplier=z)
    runs = []
    for seed in (5, 5, 6):
        step.compute(x, y, flat_grad=flat_grad, generator=torch.Generator().manual_seed(seed),
                     expected_batch_size=expected)
        runs.append(flat_grad.clone())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    assert not torch.equal(runs[0], runs[2])
    noise = (runs[0] - base).double()
    d, sd = noise.numel(), z * clip / expected
    assert abs(float(noise.mean())) < 4 * sd / math.sqrt(d)
    assert float(noise.std()) == pytest.approx(sd, rel=4 / math.sqrt(2 * d))  # ~4 standard errors


def test_os_noise_source_draws_fresh_noise_of_the_same_scale():
    """privacy.noise_source=os: the run's seed no longer regenerates the noise."""
    model, _, flat_grad = flat_model(lambda: MLP(num_features=60, num_classes=10, hidden=100))
    x, y = torch.randn(4, 60), torch.randint(0, 10, (4,))
    base = noise_free(model, x, y, flat_grad, clip=0.7, expected=8)
    step = DPSGDStep(model, max_grad_norm=0.7, noise_multiplier=1.3, noise_source="os")
    runs = []
    for _ in range(2):
        step.compute(x, y, flat_grad=flat_grad, generator=torch.Generator().manual_seed(5), expected_batch_size=8)
        runs.append(flat_grad.clone())
    assert not torch.equal(runs[0], runs[1])
    noise = (runs[0] - base).double()
    assert float(noise.std()) == pytest.approx(1.3 * 0.7 / 8, rel=4 / math.sqrt(2 * noise.numel()))


def test_an_empty_batch_gets_noise_only_and_a_nan_loss():
    model, _, flat_grad = flat_model(lambda: MLP(num_features=60, num_classes=10, hidden=100))
    step = DPSGDStep(model, max_grad_norm=2.0, noise_multiplier=0.5)
    g = torch.Generator().manual_seed(9)
    loss = step.compute(torch.zeros(0, 60), torch.zeros(0, dtype=torch.long), flat_grad=flat_grad,
                        generator=g, expected_batch_size=4)
    assert math.isnan(loss)
    want = torch.randn(flat_grad.numel(), generator=torch.Generator().manual_seed(9)) * 0.5 * 2.0 / 4
    torch.testing.assert_close(flat_grad, want)


def test_dropout_draws_a_mask_per_example():
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=11, seq_len=8, n_layer=1, n_head=2, n_embd=8, dropout=0.5)
    model.train()
    x, y = batch(gpt, 3)
    grads, _ = DPSGDStep(model, max_grad_norm=1.0, noise_multiplier=0.0).per_example_gradients(x[[0, 0]], y[[0, 0]])
    assert not torch.equal(grads["wte.weight"][0], grads["wte.weight"][1])


def test_batchnorm_is_refused_with_the_model_named():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

    with pytest.raises(FedrunError, match="Net uses BatchNorm"):
        DPSGDStep(Net(), max_grad_norm=1.0, noise_multiplier=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cudnn_lstm_is_refused_with_the_model_named():
    with pytest.raises(FedrunError, match="CharLSTM uses torch.nn.LSTM"):
        DPSGDStep(lstm().cuda(), max_grad_norm=1.0, noise_multiplier=1.0)


def test_poisson_batches_have_mean_size_q_n_and_distinct_valid_indices():
    n, q, steps = 1000, 0.1, 200
    batches = list(poisson_batches(n, sample_rate=q, num_steps=steps,
                                   generator=torch.Generator().manual_seed(0)))
    assert len(batches) == steps
    sizes = np.array([len(b) for b in batches])
    assert abs(sizes.mean() - q * n) < 3 * math.sqrt(n * q * (1 - q) / steps)
    assert all(len(set(b.tolist())) == len(b) and (b >= 0).all() and (b < n).all() for b in batches)
    again = poisson_batches(n, sample_rate=q, num_steps=steps, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))


def test_poisson_batches_can_be_empty():
    generator = torch.Generator().manual_seed(1)
    sizes = [len(b) for b in poisson_batches(10, sample_rate=0.05, num_steps=50, generator=generator)]
    assert 0 in sizes  # P(empty) = 0.95^10 ~ 0.6 per step


@pytest.mark.parametrize("name, accountant", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_client_epsilon_matches_opacus_stepped_directly(name, accountant):
    acc = accountant()
    for _ in range(30):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    want = acc.get_epsilon(1e-5)
    got = client_epsilon(noise_multiplier=1.1, sample_rate=0.05, steps=30, delta=1e-5, accountant=name)
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("sigma, steps, delta", [(1.0, 1, 1e-5), (2.0, 3, 1e-6)])
def test_client_epsilon_without_subsampling_is_the_gaussian_mechanism_in_closed_form(sigma, steps, delta):
    # RDP of the Gaussian mechanism (Mironov 2017, Prop. 7), composed over steps: steps * a / (2 s^2);
    # to (eps, delta) by Balle et al. 2020, Thm 21, the conversion opacus uses:
    # eps = rdp + log(1/delta)/(a-1) + log((a-1)/a) - log(a)/(a-1), minimised over opacus' orders.
    alphas = np.concatenate([1 + np.arange(1, 100) / 10, np.arange(12, 64)])
    rdp = steps * alphas / (2 * sigma**2)
    eps = rdp + np.log(1 / delta) / (alphas - 1) + np.log((alphas - 1) / alphas) - np.log(alphas) / (alphas - 1)
    got = client_epsilon(noise_multiplier=sigma, sample_rate=1.0, steps=steps, delta=delta)
    assert got == pytest.approx(eps.min(), rel=1e-9)
    assert 0 < eps.argmin() < len(alphas) - 1  # an interior optimum: the grid is not what binds
    assert got < (rdp + np.log(1 / delta) / (alphas - 1)).min()  # tighter than Mironov's conversion


def test_client_epsilon_edge_cases():
    assert client_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0
    assert client_epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=5, delta=1e-5) == math.inf
    with pytest.raises(FedrunError, match="accountant"):
        client_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=5, delta=1e-5, accountant="gdp")


# ---- privacy=local_dp's accounting: one Ledger of DPEvents per client --------------------------

def _local(**kw):
    from fedrun.privacy.local import LocalPrivacy

    return LocalPrivacy(**({"max_grad_norm": 1.0, "noise_multiplier": 0.9, "delta": 1e-5, "accountant": "rdp",
                            "batch_size": 4, "noise_source": "seed"} | kw))


def _participations(mechanism, rounds: int = 6):
    """Clients of different sizes and step counts, some twice a round's worth, one with no steps."""
    from fedrun.core import ClientUpdate, RoundContext

    for r in range(1, rounds + 1):
        for cid in (r % 3, 3 + r % 2, 7):
            update = ClientUpdate(client_id=cid, delta=torch.zeros(3), num_examples=10 + 7 * cid, train_loss=0.0,
                                  seconds=0.0, bytes_up=0, num_steps=(cid + r) % 4)
            mechanism.on_client(update, RoundContext(round_idx=r, seed=0, num_clients=8, cohort=[cid]))


def test_local_dp_epsilon_is_each_clients_steps_composed_as_before():
    """Each client's DPEvents compose to what its (z, q) -> steps Counter gave (bit for bit)."""
    from collections import Counter

    from fedrun.privacy.accounting import epsilon_of

    mechanism = _local()
    _participations(mechanism)
    for cid, ledger in mechanism.ledgers.items():
        counts: Counter = Counter()
        for e in ledger.events:
            assert (e.noise_multiplier, e.clip_norm, e.mechanism) == (0.9, 1.0, "dp_sgd")
            counts[(0.9, min(1.0, 4 / (10 + 7 * cid)))] += e.steps
        for accountant in ("rdp", "prv"):
            assert ledger.epsilon(1e-5, accountant=accountant) == epsilon_of(counts, 1e-5, accountant=accountant)
    worst, eps = mechanism.worst_client()
    assert eps == max(ledger.epsilon(1e-5, accountant="rdp") for ledger in mechanism.ledgers.values()) > 0
    assert mechanism.round_events(1) == []  # privacy_ledger.csv keeps the server's events only


def test_local_dp_state_loads_in_both_layouts_to_the_same_epsilons():
    """A checkpoint written before the DPEvents ({"client_steps": [[z, q, steps], ...]}) still resumes."""
    mechanism = _local()
    _participations(mechanism)
    before = mechanism.round_metrics(tight=True)
    restored = _local()
    restored.load_state_dict(mechanism.state_dict())
    assert restored.round_metrics(tight=True) == before
    old_layout = {"client_steps": {c: [[z, q, n] for (z, q), n in ledger.counts.items()]
                                   for c, ledger in mechanism.ledgers.items()}}
    from_old = _local()
    from_old.load_state_dict(old_layout)
    assert from_old.round_metrics(tight=True) == before and from_old.worst_client() == mechanism.worst_client()
