"""Evaluation: the metrics over all predictions, whatever the forward-pass batch size; never over nothing."""
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from fedrun import evaluation
from fedrun.cli import app
from fedrun.core import FedrunError
from fedrun.data.examples import Labelled, Windows
from fedrun.models.small import LogReg
from fedrun.models.tiny_gpt import TinyGPT


def test_text_metrics_equal_one_pass_over_all_windows_by_hand(monkeypatch):
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=256, seq_len=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    windows = Windows(torch.randint(0, 256, (50, 17), dtype=torch.uint8))
    monkeypatch.setattr(evaluation, "EVAL_TOKENS", 7 * 16)  # 7 windows per pass: 8 uneven passes
    assert evaluation.eval_batch(windows) == 7
    got = evaluation.evaluate(model, windows, torch.device("cpu"))
    x, y = windows.tokens[:, :-1].long(), windows.tokens[:, 1:].long()
    with torch.no_grad():
        logits = model(x)
    loss = float(F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)))
    assert math.isclose(got["eval_loss"], loss, rel_tol=1e-6)
    assert math.isclose(got["eval_ppl"], math.exp(loss), rel_tol=1e-6)
    assert got["eval_acc"] == int((logits.argmax(-1) == y).sum()) / y.numel()


def test_labelled_metrics_and_batch_size():
    torch.manual_seed(0)
    model = LogReg(num_features=5, num_classes=3)
    data = Labelled(torch.randn(2500, 5), torch.randint(0, 3, (2500,)))
    assert evaluation.eval_batch(data) == evaluation.EVAL_EXAMPLES
    got = evaluation.evaluate(model, data, torch.device("cpu"))
    with torch.no_grad():
        logits = model(data.features)
    assert math.isclose(got["eval_loss"], float(F.cross_entropy(logits, data.labels)), rel_tol=1e-6)


@pytest.mark.parametrize("empty", [Windows(torch.zeros((0, 17), dtype=torch.uint8)),
                                   Labelled(torch.zeros((0, 5)), torch.zeros(0, dtype=torch.long))])
def test_an_empty_set_is_an_error_not_loss_0_and_ppl_1(empty):
    model = LogReg(num_features=5, num_classes=3) if isinstance(empty, Labelled) else TinyGPT(
        vocab_size=256, seq_len=16, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    with pytest.raises(FedrunError, match="no test examples"):
        evaluation.evaluate(model, empty, torch.device("cpu"))


@pytest.mark.parametrize("data", [[], ["data=synthetic", "model=logreg", "data.num_clients=6"]])
def test_test_fraction_0_is_refused_in_one_line(play, tmp_path, data):
    """fedrun's metrics are test metrics: with nothing held out there is nothing to report."""
    text = [] if data else ["data=shakespeare", f"data.path={play}"]
    result = CliRunner().invoke(app, ["train", *text, *data, f"run_dir={tmp_path / 'run'}", "rounds=1",
                                      "device=cpu", "data.test_fraction=0"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: data.test_fraction: 0.0 is not allowed; allowed: a number in (0, 1)")
    assert not (tmp_path / "run" / "metrics.csv").exists()
