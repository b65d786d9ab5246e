import torch

from fedrun.models.lstm import CharLSTM
from fedrun.models.tiny_gpt import TinyGPT
from fedrun.params import flatten_parameters


def _gpt(**kw):
    return TinyGPT(**({"vocab_size": 256, "seq_len": 12, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0} | kw))


def test_tiny_gpt_maps_tokens_to_logits_and_is_causal():
    torch.manual_seed(0)
    model = _gpt().eval()
    x = torch.randint(0, 256, (3, 12))
    logits = model(x)
    assert logits.shape == (3, 12, 256)
    changed = x.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 256  # alter only the future of position 6
    torch.testing.assert_close(model(changed)[:, :7], logits[:, :7])
    assert not torch.allclose(model(changed)[:, 7:], logits[:, 7:])


def test_tiny_gpt_ties_output_layer_to_embedding():
    model = _gpt()
    assert model.lm_head.weight is model.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names  # counted once in the update vector


def test_lstm_has_the_leaf_shakespeare_shape():
    model = CharLSTM(vocab_size=256, seq_len=80, embed_dim=8, hidden_size=256, num_layers=2)
    x = torch.randint(0, 256, (2, 80))
    assert model(x).shape == (2, 80, 256)
    # Closed form: embedding V*8; each LSTM layer 4h(in + h) weights + 2*4h biases; dense h*V + V.
    h, V = 256, 256
    expected = V * 8 + (4 * h * (8 + h) + 8 * h) + (4 * h * (h + h) + 8 * h) + h * V + V
    assert sum(p.numel() for p in model.parameters()) == expected


def test_flat_parameters_are_views_that_keep_values_and_gradients_flow():
    torch.manual_seed(0)
    model = _gpt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = flatten_parameters(model)
    assert flat.numel() == sum(p.numel() for p in model.parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n])
    flat.zero_()
    assert all(float(p.detach().abs().sum()) == 0 for p in model.parameters())
    flat.copy_(torch.cat([before[n].reshape(-1) for n, _ in model.named_parameters()]))
    model(torch.randint(0, 256, (2, 12))).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_a_diverged_model_scores_infinite_perplexity_instead_of_crashing():
    from fedrun.data.examples import Windows
    from fedrun.evaluation import evaluate

    model = _gpt()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e6)  # absurd logits: cross-entropy in the thousands
    scores = evaluate(model, Windows(torch.randint(0, 256, (4, 13), dtype=torch.uint8)), torch.device("cpu"))
    assert scores["eval_loss"] > 709 and scores["eval_ppl"] == float("inf")
