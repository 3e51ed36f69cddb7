"""Damping relative to the curvature: one rule for every influence estimator (issue 15).

An influence estimator solves ``(C + (wd + damping) I) s = g`` with C the curvature (GGN or
Hessian) of the mean training loss and wd the training weight decay. A fixed damping (say 0.01)
means different things on different models: on a converged, well-conditioned logistic
regression it swamps the small curvature directions that leave-one-out depends on; on a network
whose GGN has thousands of near-zero directions it is what keeps the solve from dividing by
almost nothing. So the default damping is relative to the model's own spectrum::

    damping = RELATIVE * mean eigenvalue of C = RELATIVE * trace(C) / d

(Kronfluence's heuristic, 0.1 x the mean eigenvalue, which ``if_ekfac`` applies per module to
its Kronecker eigenvalues). trace(C) is estimated with seeded Hutchinson probes
(``mean_eigenvalue``, seed ``ctx.seed``); ``if_exact`` applies the same probes to the matrix it
builds, so exact, CG, LiSSA and Arnoldi damp alike on the same model. A number given as
``damping`` is used as is (absolute), e.g. ``damping: 0`` for the undamped solve.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from estimators.hvp import MatVec

RELATIVE = 0.1
"""Default damping as a fraction of the curvature's mean eigenvalue."""

PROBES = 32
"""Rademacher probes of the Hutchinson trace estimate."""


def check_damping(damping: float | None) -> None:
    """ValueError unless ``damping`` is None (relative) or a number >= 0."""
    if damping is not None and not damping >= 0:
        raise ValueError(f"damping must be >= 0 or None (relative to the curvature), got {damping}")


def relative_damping(mean_eigenvalue: float) -> float:
    """The default damping for a curvature whose mean eigenvalue is ``mean_eigenvalue``
    (clipped at 0: an indefinite Hessian can have a negative mean)."""
    return RELATIVE * max(mean_eigenvalue, 0.0)


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


def resolve(damping: float | None, mean: Callable[[], float]) -> float:
    """The damping to use: ``damping`` when given, else ``relative_damping(mean())`` (``mean``
    is called only then)."""
    return float(damping) if damping is not None else relative_damping(mean())
