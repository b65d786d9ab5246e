"""Evaluation: the metrics over all predictions, whatever the forward-pass batch size."""
import math

import torch
import torch.nn.functional as F

from fedrun import evaluation
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
