"""Matrix-free curvature products (spec section 11.4): finite differences, explicit matrices."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from estimators.gradient_source import summed_loss_gradient
from estimators.hvp import (
    curvature_operator,
    finite_difference_hvp,
    flat_gradient,
    flat_loss,
    ggn_vp,
    hvp,
    power_iteration,
)
from estimators.influence import curvature_matrix
from estimators.per_sample import flat_parameters, parameter_count

WD = 0.03


@pytest.fixture(scope="module", params=["linear", "mlp"])
def case(request, digits, kit):
    """A trained-for-a-bit model on 120 digit rows (float64) and a random direction v."""
    torch.manual_seed(0)
    factory = kit.linear_factory() if request.param == "linear" else kit.mlp_factory()
    model = factory()
    x = torch.from_numpy(digits["train_x"][:120])
    y = torch.from_numpy(digits["train_y"][:120])
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(parameter_count(model), dtype=torch.float64, generator=gen)
    return model, x, y, v


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_flat_loss_and_gradient_match_autograd(case) -> None:
    model, x, y, _ = case
    theta = flat_parameters(model)
    expected = nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(flat_loss(model, x, y)(theta), expected, rtol=1e-12)
    g = flat_gradient(model, x, y)
    assert torch.allclose(g, summed_loss_gradient(model, x, y) / len(y), rtol=1e-10, atol=1e-14)
    assert torch.allclose(flat_gradient(model, x, y, theta), g, rtol=0, atol=0)


def test_finite_difference_matches_autograd_hvp(case) -> None:
    model, x, y, v = case
    exact = hvp(model, x, y, v)
    central = _relative(finite_difference_hvp(model, x, y, v), exact)
    forward = _relative(finite_difference_hvp(model, x, y, v, eps=1e-6, central=False), exact)
    assert central < 1e-3, f"central finite difference: relative error {central:.2e}"
    assert forward < 1e-3, f"forward finite difference: relative error {forward:.2e}"


def test_products_match_explicit_curvature(case) -> None:
    model, x, y, v = case
    hessian = curvature_matrix(model, x, y, kind="hessian")
    ggn = curvature_matrix(model, x, y, kind="ggn")
    assert torch.allclose(hvp(model, x, y, v, WD), hessian @ v + WD * v, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ggn_vp(model, x, y, v, WD), ggn @ v + WD * v, rtol=1e-9, atol=1e-12)


def test_operator_chunks_and_columns(case) -> None:
    model, x, y, v = case
    ggn = curvature_matrix(model, x, y, kind="ggn")
    hessian = curvature_matrix(model, x, y, kind="hessian")
    columns = torch.stack([v, -2 * v, torch.roll(v, 3)], dim=1)
    for kind, matrix in (("ggn", ggn), ("hessian", hessian)):
        op = curvature_operator(model, x, y, kind=kind, shift=WD, chunk_size=50, column_block=2)
        expected = matrix @ columns + WD * columns
        assert torch.allclose(op(columns), expected, rtol=1e-9, atol=1e-12)
        assert torch.allclose(op(v), expected[:, 0], rtol=1e-9, atol=1e-12)


def test_float32_model_is_probed_in_the_vector_dtype(case) -> None:
    model, x, y, v = case
    model32 = copy.deepcopy(model).to(torch.float32)
    out = hvp(model32, x.to(torch.float32), y, v)
    assert out.dtype == torch.float64
    assert _relative(out, hvp(model, x, y, v)) < 1e-5


def test_power_iteration_finds_the_top_eigenvalue(case) -> None:
    model, x, y, _ = case
    ggn = curvature_matrix(model, x, y, kind="ggn")
    top = torch.linalg.eigvalsh(ggn)[-1].item()
    estimate = power_iteration(lambda u: ggn_vp(model, x, y, u), ggn.shape[0], iters=100)
    assert estimate <= top * (1 + 1e-9)
    assert estimate == pytest.approx(top, rel=1e-3)
    diagonal = torch.tensor([5.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    assert power_iteration(lambda u: diagonal * u, 4, iters=60) == pytest.approx(5.0, rel=1e-9)
