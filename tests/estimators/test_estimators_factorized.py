"""Factorized (LoGra) projection: equal to the dense projection by P_out kron P_in, never forms a
(rows x d) tensor, bit-identical under any sharding of the samples, and read by TRAK."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from estimators.factorized import FactorizedProjector
from estimators.per_sample import parameter_count, per_sample_gradients
from estimators.projection import Projector
from tasks.gradients import shard_gradients
from tasks.memory import peak_memory


def _conv_linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2, bias=False),
        nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 3),
    ).to(torch.float64).eval()


def _layer_gradient(grads: torch.Tensor, layer) -> torch.Tensor:
    """(m, d_out, d_in [+1]) gradient of one layer, the bias column last."""
    w = grads[:, layer.weight_offset : layer.weight_offset + layer.d_out * layer.d_in]
    g = w.reshape(len(grads), layer.d_out, layer.d_in)
    if layer.bias_offset is not None:
        b = grads[:, layer.bias_offset : layer.bias_offset + layer.d_out]
        g = torch.cat([g, b[:, :, None]], dim=2)
    return g


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_factorized_equals_the_kronecker_projection_of_the_full_gradient(kind) -> None:
    model = _conv_linear()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 2, 4, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (7,), generator=gen)
    projector = FactorizedProjector.for_model(model, k_in=5, k_out=2, seed=3, kind=kind,
                                              block_rows=4)
    assert [lay.kind for lay in projector.layers] == ["conv2d", "conv2d", "linear", "linear"]
    assert [(lay.k_out, lay.k_in) for lay in projector.layers] == [(2, 5), (2, 5), (2, 5),
                                                                   (2, 5)]
    grads = per_sample_gradients(model, x, y)
    expected = []
    for index, layer in enumerate(projector.layers):
        p_in, p_out = projector.matrices(index, torch.device("cpu"), torch.float64)
        vec = _layer_gradient(grads, layer).reshape(len(x), -1)
        expected.append(vec @ torch.kron(p_out, p_in) / math.sqrt(layer.features))
    expected = torch.cat(expected, dim=1)
    assert expected.shape == (7, projector.k) and projector.k == 4 * 10
    features = projector.features(model, x, y, dtype=torch.float64)
    torch.testing.assert_close(features, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(projector.project(grads, dtype=torch.float64), expected,
                               rtol=1e-10, atol=1e-12)
    # small layers cap k_in/k_out at their sizes (the last Linear has 3 outputs, 7 inputs)
    wide = FactorizedProjector.for_model(model, k_in=64, k_out=64, seed=3)
    assert (wide.layers[-1].k_out, wide.layers[-1].k_in) == (3, 7)


def test_inner_products_are_preserved_on_average() -> None:
    model = _conv_linear()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 1])
    g = per_sample_gradients(model, x, y)
    exact = float(g[0] @ g[1])
    estimates = []
    for seed in range(200):
        f = FactorizedProjector.for_model(model, 4, 2, seed).features(model, x, y,
                                                                     dtype=torch.float64)
        estimates.append(float(f[0] @ f[1]))
    scale = float(g[0].norm() * g[1].norm())
    assert abs(sum(estimates) / 200 - exact) < 4 * scale / math.sqrt(200 * 8)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_factorized_run_never_allocates_a_rows_by_d_tensor() -> None:
    """The gradient stage's shard computation with the factorized kind: no tensor of rows x d
    (or even of d) elements is created, where the dense path creates one; and its peak RSS
    stays far below the rows x d float32 block the dense path would hold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10)).eval()
    d, rows = parameter_count(model), 64
    x, y = torch.randn(rows, 128), torch.randint(0, 10, (rows,))
    factorized = FactorizedProjector.for_model(model, 16, 16, seed=0, block_rows=64)
    with _LargestTensor() as seen:
        out = shard_gradients(model, x, y, factorized, rows)
    assert out.shape == (rows, factorized.k)
    assert seen.largest < d, (seen.largest, d)
    dense = Projector.for_model(model, 64, seed=0)
    with _LargestTensor() as seen_dense:
        shard_gradients(model, x, y, dense, rows)
    assert seen_dense.largest >= rows * d  # today's path: the per-sample gradients exist

    big = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)).eval()
    n = 256
    xb, yb = torch.randn(n, 1024), torch.randint(0, 10, (n,))
    projector = FactorizedProjector.for_model(big, 32, 32, seed=0)
    shard_gradients(big, xb[:8], yb[:8], projector, n)  # warm-up: P_in/P_out drawn
    with peak_memory(0.001) as peak:
        shard_gradients(big, xb, yb, projector, n)
    block_mib = n * parameter_count(big) * 4 / 2**20  # 1 GiB: what (rows, d) float32 takes
    assert peak.delta_mb < block_mib / 8, (peak.delta_mb, block_mib)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_identical_across_sample_shards(dtype) -> None:
    model = _conv_linear().to(dtype)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 2, 4, 4, generator=gen).to(dtype)
    y = torch.randint(0, 3, (50,), generator=gen)
    projector = FactorizedProjector.for_model(model, 6, 3, seed=1, block_rows=16)
    whole = projector.features(model, x, y)
    shards = [(0, 1), (1, 13), (13, 40), (40, 50)]  # uneven, none a block multiple
    parts = torch.cat([projector.features(model, x[a:b], y[a:b], first_row=a)
                       for a, b in shards])
    assert torch.equal(whole, parts)
    again = FactorizedProjector.for_model(model, 6, 3, seed=1, block_rows=16)
    assert torch.equal(again.features(model, x[13:40], y[13:40], first_row=13), whole[13:40])


def test_refuses_uncovered_parameters_and_unknown_modules() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="not in a covered"):
        FactorizedProjector.for_model(model, 2, 2, seed=0)
    model[1].requires_grad_(False)
    assert FactorizedProjector.for_model(model, 2, 2, seed=0).k == 2 * 2 + 2 * 2
    with pytest.raises(ValueError, match="covers Linear and Conv2d"):
        FactorizedProjector.for_model(model, 2, 2, seed=0, modules=["1"])
    model.requires_grad_(False)
    model[0].requires_grad_(True)
    selected = FactorizedProjector.for_model(model, 2, 2, seed=0, modules=["0"])
    assert [lay.name for lay in selected.layers] == ["0"]


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.head = nn.Linear(3, 4), nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.left(left) + self.right(right)))


def test_multi_input_model_with_a_module_selection() -> None:
    """Inputs as a mapping of columns (``workloads.inputs.call_model``) and a selection of
    modules (the others frozen, as ``model.modules`` does): the hooks' features equal the
    factorized projection of the per-sample gradients of the selected parameters."""
    torch.manual_seed(0)
    model = _TwoInputs().to(torch.float64).eval()
    model.right.requires_grad_(False)
    gen = torch.Generator().manual_seed(3)
    x = {"left": torch.randn(9, 3, dtype=torch.float64, generator=gen),
         "right": torch.randn(9, 2, dtype=torch.float64, generator=gen)}
    y = torch.randint(0, 3, (9,), generator=gen)
    projector = FactorizedProjector.for_model(model, 3, 2, seed=4, block_rows=4)
    assert [lay.name for lay in projector.layers] == ["left", "head"]
    grads = per_sample_gradients(model, x, y)
    assert grads.shape[1] == parameter_count(model) == 4 * 4 + 3 * 5
    torch.testing.assert_close(projector.features(model, x, y, dtype=torch.float64),
                               projector.project(grads, dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)
