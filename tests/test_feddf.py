"""FedDF: ensemble distillation on a public corpus after averaging."""
import pandas as pd
import pytest
import torch

from fedrun import config, train
from fedrun.core import FedrunError
from fedrun.models.tiny_gpt import TinyGPT
from fedrun.params import flatten_parameters
from fedrun.strategies.feddf import distillation_loss, ensemble_target

PUBLIC = ["strategy.public.max_client_bytes=1500", "strategy.public.min_samples=2", "strategy.distill_batch=8"]


def test_ensemble_target_is_the_mean_of_the_clients_softened_distributions():
    torch.manual_seed(0)
    models = [TinyGPT(vocab_size=256, seq_len=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0) for _ in range(3)]
    vectors = [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in models]
    teacher = TinyGPT(vocab_size=256, seq_len=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    flat = flatten_parameters(teacher)
    x = torch.randint(0, 256, (4, 8))
    got = ensemble_target(teacher, flat, vectors, x, temperature=2.0)
    with torch.no_grad():  # independently: three separate models, softmax by hand
        expected = sum(torch.exp(m(x) / 2.0) / torch.exp(m(x) / 2.0).sum(-1, keepdim=True) for m in models) / 3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # The loss is T^2 KL(target || student), zero when the student is the target.
    assert float(distillation_loss(torch.log(expected) * 2.0, expected, 2.0)) == pytest.approx(0.0, abs=1e-6)


def _run(compose_cfg, tmp_path, name, *overrides):
    return train.train(config.build(compose_cfg("strategy=feddf", *PUBLIC, "rounds=2", f"run_dir={tmp_path / name}",
                                                *overrides)))


def test_feddf_with_zero_distillation_steps_equals_fedavg_exactly(compose_cfg, tmp_path):
    feddf, summary = _run(compose_cfg, tmp_path, "feddf", "strategy.distill_steps=0")
    fedavg, _ = train.train(config.build(compose_cfg("rounds=2", f"run_dir={tmp_path / 'fedavg'}")))
    pd.testing.assert_frame_equal(pd.read_csv(feddf / "metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(fedavg / "metrics.csv").drop(columns="seconds"), check_exact=True)
    assert summary["public_data"]["source"] == "pystdlib" and summary["data"]["source"] == "shakespeare"


def test_distillation_keeps_the_weights_that_fit_the_ensemble_best_on_held_out_text(compose_cfg, tmp_path):
    exp = config.build(compose_cfg("strategy=feddf", *PUBLIC, "strategy.distill_steps=20", "strategy.eval_every=5",
                                   "strategy.distill_lr=0.01", f"run_dir={tmp_path / 'd'}"))
    s = exp.strategy
    torch.manual_seed(1)
    start = torch.cat([p.detach().reshape(-1) for p in exp.make_model().parameters()])
    teachers = [start + 0.05 * torch.randn_like(start) for _ in range(3)]
    held_x, _ = s.held_out[: s.batch * 4].inputs_targets(s.device)
    target = ensemble_target(s.teacher, s.teacher_flat, teachers, held_x, s.temperature)

    def held_out_loss(w):
        s.student_flat.copy_(w)
        return s._held_out_loss(held_x, target)

    before = held_out_loss(start)
    result = s.distill(start, teachers)
    assert held_out_loss(result) < before


def test_the_public_corpus_must_not_be_the_clients_data(tmp_path):
    with pytest.raises(FedrunError, match="strategy.public: the public corpus is the clients' own data"):
        config.build(config.compose(["strategy=feddf", "data.max_client_bytes=1500",
                                     "strategy.public.max_client_bytes=1500", f"run_dir={tmp_path}"]))
