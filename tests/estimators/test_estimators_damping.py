"""The default damping's Hessian term (``estimators.damping.negative_curvature``) against the
smallest eigenvalue of the dense Hessian, on a network away from a minimum."""

from __future__ import annotations

import torch
from torch.func import hessian

from estimators.damping import negative_curvature
from estimators.hvp import flat_loss
from estimators.per_sample import flat_parameters


def test_negative_curvature_finds_the_hessians_smallest_eigenvalue(digits, kit) -> None:
    """A 15-16-3 tanh MLP at its random initialization (d = 307) has negative Hessian
    directions; 40 Arnoldi steps on float32 products find the depth of the most negative one
    from inside the spectrum (never deeper, up to float32 rounding)."""
    x, y = torch.as_tensor(digits["train_x"]), torch.as_tensor(digits["train_y"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = kit.mlp_factory()()
    dense = hessian(flat_loss(model, x, y))(flat_parameters(model))
    smallest = float(torch.linalg.eigvalsh((dense + dense.T) / 2)[0])
    assert smallest < 0
    depth = negative_curvature(model, x, y, seed=0)
    assert 0.5 * -smallest <= depth <= -smallest * (1 + 1e-5)
    assert negative_curvature(model, x, y, seed=0) == depth  # seeded
