"""The layerwise (closed-form) per-sample gradient route against an autograd loop, and when it
steps aside for the vmap route."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from estimators.per_sample import layerwise_supported, per_sample_gradients


def _loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (2, 9, 9)),
        nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(4, 3, (2, 3), stride=(1, 2), bias=False), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Dropout(0.5), nn.Linear(6, 5),
    )
    return model.double().eval()


def test_conv_and_linear_rows_match_an_autograd_loop() -> None:
    model = _cnn()
    model[1].bias.requires_grad_(False)  # frozen parameters are left out
    x = torch.randn(13, 162, dtype=torch.float64)
    y = torch.randint(0, 5, (13,))
    assert layerwise_supported(model)
    got = per_sample_gradients(model, x, y, chunk_size=5)
    torch.testing.assert_close(got, _loop(model, x, y), rtol=1e-10, atol=1e-12)


def test_a_layer_used_twice_sums_its_contributions() -> None:
    torch.manual_seed(1)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Unflatten(1, (3, 4)), shared, nn.Tanh(), shared, nn.Flatten(),
                          nn.Linear(12, 3)).double().eval()
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 3, (7,))
    assert layerwise_supported(model)
    torch.testing.assert_close(per_sample_gradients(model, x, y), _loop(model, x, y),
                               rtol=1e-10, atol=1e-12)


class _Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x - x.mean(0))  # rows interact: only vmap gets per-sample semantics


def test_other_models_take_the_vmap_route() -> None:
    torch.manual_seed(2)
    assert not layerwise_supported(_Custom())
    assert not layerwise_supported(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).eval())
    assert not layerwise_supported(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)).train())
    model = _Custom().double().eval()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    got = per_sample_gradients(model, x, y)
    one_row = torch.stack([per_sample_gradients(model, x[i : i + 1], y[i : i + 1])[0]
                           for i in range(6)])
    torch.testing.assert_close(got, one_row)  # each row as if alone, as vmap computes it
