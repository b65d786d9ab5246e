import torch

from fedrun.models.small import MLP, LogReg


def test_logreg_maps_features_to_class_logits_with_one_linear_layer():
    model = LogReg(num_features=60, num_classes=10)
    assert model(torch.randn(7, 60)).shape == (7, 10)
    assert sum(p.numel() for p in model.parameters()) == 60 * 10 + 10


def test_logreg_is_an_affine_map():
    model = LogReg(num_features=4, num_classes=3)
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), x @ model.linear.weight.T + model.linear.bias)


def test_mlp_has_one_hidden_relu_layer():
    model = MLP(num_features=60, num_classes=10, hidden=64)
    assert model(torch.randn(7, 60)).shape == (7, 10)
    assert sum(p.numel() for p in model.parameters()) == 60 * 64 + 64 + 64 * 10 + 10
    first, _, last = model.net
    x = torch.randn(5, 60)
    torch.testing.assert_close(model(x), last(torch.relu(first(x))))
