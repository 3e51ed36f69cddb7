"""Damping relative to the curvature: one rule for every influence estimator (issue 15).

An influence estimator solves ``(C + (wd + damping) I) s = g`` with C the curvature (GGN or
Hessian) of the mean training loss and wd the training weight decay. A fixed damping (say 0.01)
means different things on different models: on a converged, well-conditioned logistic
regression it swamps the small curvature directions that leave-one-out depends on; on a network
whose Hessian has negative directions the model is not at a minimum, the quadratic model behind
the influence function is wrong there, and the solve must not trust curvature smaller than that
error. So the default damping is read off the model's own spectrum::

    damping = max(RELATIVE * mean eigenvalue of C,  -lambda_min(Hessian))

The first term (Kronfluence's heuristic, 0.1 x trace(C) / d) scales the damping with the
curvature; the second is the smallest damping that makes the damped Hessian positive
semi-definite: 0 for a convex model (logistic regression: Hessian = GGN), the depth of the
negative curvature for a network. trace(C) comes from seeded Hutchinson probes
(``mean_eigenvalue``), lambda_min from ``NEGATIVE_STEPS`` Arnoldi steps on Hessian-vector
products over the training rows (``negative_curvature``), both seeded by ``ctx.seed``:
``if_exact`` applies the same probes to the matrix it builds, so exact, CG, LiSSA and Arnoldi
damp alike on the same model; ``if_ekfac`` takes its first term per module from its Kronecker
eigenvalues. A number given as ``damping`` is used as is (absolute), e.g. ``damping: 0``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from estimators.hvp import MatVec, arnoldi_eigenpairs, curvature_operator, in_dtype
from estimators.per_sample import parameter_count

RELATIVE = 0.1
"""Default damping as a fraction of the curvature's mean eigenvalue."""

PROBES = 32
"""Rademacher probes of the Hutchinson trace estimate."""

NEGATIVE_STEPS = 40
"""Arnoldi steps on the Hessian for its smallest eigenvalue (extreme Ritz values converge
first)."""


def check_damping(damping: float | None) -> None:
    """ValueError unless ``damping`` is None (relative) or a number >= 0."""
    if damping is not None and not damping >= 0:
        raise ValueError(f"damping must be >= 0 or None (relative to the curvature), got {damping}")


def relative_damping(mean_eigenvalue: float, negative: float = 0.0) -> float:
    """The default damping: ``max(RELATIVE * mean_eigenvalue, negative)`` for a curvature whose
    mean eigenvalue is ``mean_eigenvalue`` (clipped at 0) and a Hessian whose smallest
    eigenvalue is ``-negative``."""
    return max(RELATIVE * max(mean_eigenvalue, 0.0), negative)


def negative_curvature(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int,
    device: torch.device | str | None = None,
) -> float:
    """``max(0, -lambda_min)`` of the Hessian of the mean cross-entropy on (x, y): the smallest
    Ritz value of ``NEGATIVE_STEPS`` Arnoldi steps (seeded by ``seed``; float64 basis) on
    Hessian-vector products in float32 (their rounding, about 1e-7 of lambda_max, moved the
    estimate by at most 2e-7 relative on the digits networks against float64 products, at
    about 0.6 of the cost). A Ritz value lies inside the spectrum, so this never exceeds the
    true depth (up to that rounding). Cost: ``NEGATIVE_STEPS`` Hessian-vector products over
    the rows."""
    d = parameter_count(model)
    hessian = in_dtype(curvature_operator(model, x, y, kind="hessian"), torch.float32)
    values, _ = arnoldi_eigenpairs(hessian, d, min(d, NEGATIVE_STEPS), seed=seed, device=device)
    return max(0.0, -float(values.min()))


def mean_eigenvalue(
    operator: MatVec,
    d: int,
    seed: int,
    probes: int = PROBES,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> float:
    """Hutchinson estimate of ``trace(A) / d`` for a symmetric operator A ((d, m) -> (d, m)).

    ``probes`` Rademacher vectors drawn on the CPU from a generator seeded by ``seed``, applied
    as one (d, probes) matrix; unbiased, relative error about ``sqrt(2 / probes) * ||A||_F /
    trace(A)``. Cost: ``probes`` operator columns.
    """
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d, probes), generator=gen).to(dtype) * 2 - 1
    signs = signs.to(device)
    return float((signs * operator(signs)).sum() / (probes * d))


def resolve(damping: float | None, default: Callable[[], float]) -> float:
    """The damping to use: ``damping`` when given, else ``default()`` (called only then)."""
    return float(damping) if damping is not None else default()
