"""Influence functions with matrix-free curvature solves: CG, LiSSA and Arnoldi (spec section 4).

All three approximate ``s = (C + (wd + damping) I)^{-1} g_V`` with C the GGN (default, PSD) or
the exact Hessian of the mean training cross-entropy at theta_final, evaluated on the training
set ``ctx.train_x/train_y`` (all rows, or a fixed seeded subset of ``hvp_batch`` rows) through
Hessian/GGN-vector products (``estimators.hvp``), and score ``score(z) = g_z . s``. ``damping``
None (the default): max(0.1 x the mean eigenvalue of C, minus the Hessian's smallest
eigenvalue), estimated by Hutchinson probes and Arnoldi (``estimators.damping``); a number:
that absolute value. As for
``ExactInfluence``: ``score(z) ~ n * [U(theta_without_z) - U(theta)]`` for the summed target loss
U (positive = beneficial, units of target loss times n). ``wd`` is ``ctx.weight_decay`` (lam in
``mean loss + (lam/2)||theta||^2``); ``damping`` is the extra lambda of spec section 13.

Work is in float64 (stored gradients are cast; the model is probed with float64 vectors), except
the curvature products of LiSSA and Arnoldi (float32 by default, ``products``: their error is
far below what those methods approximate anyway; CG's stay float64).
``pairwise`` runs the same solve with every target row's gradient as a right-hand side and
returns (train ids (n,), target ids (m,), scores (n, m) float64).
"""

from __future__ import annotations

import hashlib
import warnings
from abc import abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from estimators._streaming import gradient_source, linear_pairwise, stream
from estimators.base import (
    Attribution,
    Estimator,
    GradientSource,
    Needs,
    PairwiseVectors,
    ScoringContext,
)
from estimators.damping import (
    PROBES,
    check_damping,
    mean_eigenvalue,
    negative_curvature,
    relative_damping,
    resolve,
)
from estimators.hvp import (
    MatVec,
    arnoldi_eigenpairs,
    curvature_operator,
    dense_eigenpairs,
    in_dtype,
    power_iteration,
    ritz_pairs,
    signed_gradient_sums,
)
from estimators.influence import CURVATURES, Curvature
from estimators.per_sample import parameter_count, per_sample_gradients
from workloads.inputs import Inputs, num_rows, take, to_device

_SUBSET_STREAM = 0x48
"""Salt of the seed that picks the ``hvp_batch`` rows (``SeedSequence([ctx.seed, salt])``)."""


@dataclass
class _Problem:
    """The damped curvature operator ``A = C + shift * I`` of one scoring call (``undamped``:
    C alone)."""

    model: nn.Module
    x: Inputs
    y: torch.Tensor
    d: int
    shift: float
    operator: MatVec
    undamped: MatVec
    mean: float  # Hutchinson estimate of C's mean eigenvalue
    digest: str  # of the model's parameters and the rows


def conjugate_gradient(
    matmat: MatVec, rhs: torch.Tensor, rtol: float = 1e-6, maxiter: int = 200
) -> tuple[torch.Tensor, int, float]:
    """Solve ``A X = rhs`` for SPD A by conjugate gradients, every column at once.

    ``rhs`` (d, m); ``matmat`` maps (d, k) to (d, k) for any subset of k columns. Column j stops
    when ``||r_j|| <= rtol * ||rhs_j||`` (warm start 0). Returns (X (d, m), iterations, largest
    relative residual). Raises ValueError when A shows non-positive curvature (p^T A p <= 0).
    Cost: at most ``maxiter`` products with the still-active columns.
    """
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rs = (residual * residual).sum(dim=0)
    rhs_norm = torch.linalg.vector_norm(rhs, dim=0)
    tol = rtol * rhs_norm
    active = rs.sqrt() > tol
    iterations = 0
    while bool(active.any()) and iterations < maxiter:
        iterations += 1
        p = direction[:, active]
        ap = matmat(p)
        curvature = (p * ap).sum(dim=0)
        if bool((curvature <= 0).any()):
            raise ValueError(
                "conjugate gradient met non-positive curvature p^T A p <= 0: the damped "
                "curvature is not positive definite; increase damping or use curvature='ggn'"
            )
        alpha = rs[active] / curvature
        solution[:, active] += alpha * p
        residual[:, active] -= alpha * ap
        rs_new = (residual[:, active] ** 2).sum(dim=0)
        direction[:, active] = residual[:, active] + (rs_new / rs[active]) * p
        rs[active] = rs_new
        active = rs.sqrt() > tol
    relative = rs.sqrt() / torch.where(rhs_norm > 0, rhs_norm, torch.ones_like(rhs_norm))
    worst = float(relative.max()) if relative.numel() else 0.0
    return solution, iterations, worst


BLOCK_MEMORY_BYTES = 2**30
"""Largest basis (Krylov vectors and their images, float64) one ``block_conjugate_gradient``
keeps: ``if_cg`` solves its right-hand sides in groups of ``block_width`` columns."""


def block_width(d: int, maxiter: int) -> int:
    """Most right-hand sides one block CG solve may take within ``BLOCK_MEMORY_BYTES``
    (``2 * d * min(d, maxiter * m)`` float64); 0 when not even one fits (then column-wise CG)."""
    if 16 * d * min(d, maxiter) > BLOCK_MEMORY_BYTES:
        return 0
    if 16 * d * d <= BLOCK_MEMORY_BYTES:
        return 2**31
    return BLOCK_MEMORY_BYTES // (16 * d * maxiter)


def block_conjugate_gradient(
    matmat: MatVec, rhs: torch.Tensor, rtol: float = 1e-6, maxiter: int = 200
) -> tuple[torch.Tensor, int, float]:
    """Solve ``A X = rhs`` for SPD A over one shared block Krylov space (block CG).

    ``rhs`` (d, m). Step k applies A to a block of at most m new orthonormal directions: the
    residuals of the still-unconverged columns (each right-hand side scaled to norm 1 first),
    orthogonalized (twice) against the basis Q, with directions below 1e-12 dropped
    (rank-revealing SVD). X is the Galerkin
    solution ``Q (Q^T A Q)^{-1} Q^T rhs``: in exact arithmetic block CG's iterate, the A-norm
    error minimizer over the block Krylov space, so every column profits from the directions
    the others found and the step count is far below column-wise CG's. Column j stops when
    ``||r_j|| <= rtol * ||rhs_j||``; the solve stops when all have, after ``maxiter`` steps, or
    when the basis spans R^d. Returns (X (d, m), steps, largest relative residual). Raises
    ValueError when ``Q^T A Q`` is not positive definite. Memory: the basis and its image, at
    most ``2 * d * min(d, maxiter * m)`` floats.
    """
    d, m = rhs.shape
    rhs_norm = torch.linalg.vector_norm(rhs, dim=0)
    scale = torch.where(rhs_norm > 0, rhs_norm, torch.ones_like(rhs_norm))
    basis = torch.empty(d, 0, dtype=rhs.dtype, device=rhs.device)
    image = torch.empty_like(basis)
    factor = torch.empty(0, 0, dtype=rhs.dtype, device=rhs.device)  # Cholesky of Q^T A Q
    projected = torch.empty(0, m, dtype=rhs.dtype, device=rhs.device)  # Q^T rhs
    unit = rhs / scale  # unit columns: one drop threshold and one rtol serve every column
    solution, residual = torch.zeros_like(rhs), unit.clone()
    relative = torch.linalg.vector_norm(residual, dim=0)
    active = relative > rtol
    steps = 0
    while bool(active.any()) and steps < maxiter and basis.shape[1] < d:
        block = residual[:, active]
        for _ in range(2):
            block = block - basis @ (basis.T @ block)
        u, sing, _ = torch.linalg.svd(block, full_matrices=False)
        keep = sing > 1e-12
        if not bool(keep.any()):
            break
        new = u[:, keep]
        steps += 1
        applied = matmat(new)
        corner = new.T @ applied
        below = torch.linalg.solve_triangular(factor, basis.T @ applied, upper=False).T
        tail, info = torch.linalg.cholesky_ex((corner + corner.T) / 2 - below @ below.T)
        if int(info) != 0:
            raise ValueError(
                "block conjugate gradient met non-positive curvature (Q^T A Q not positive "
                "definite): the damped curvature is not positive definite; increase damping or "
                "use curvature='ggn'"
            )
        zeros = torch.zeros(factor.shape[0], tail.shape[0], dtype=rhs.dtype, device=rhs.device)
        factor = torch.cat([torch.cat([factor, zeros], 1), torch.cat([below, tail], 1)], 0)
        basis, image = torch.cat([basis, new], 1), torch.cat([image, applied], 1)
        projected = torch.cat([projected, new.T @ unit], 0)
        coefficients = torch.cholesky_solve(projected, factor)
        solution = basis @ coefficients
        residual = unit - image @ coefficients
        relative = torch.linalg.vector_norm(residual, dim=0)
        active = relative > rtol
    worst = float(relative.max()) if relative.numel() else 0.0
    return solution * scale, steps, worst


DIVERGENCE_CHECK_EVERY = 16
"""LiSSA steps between two divergence checks (a column norm over (d, m) costs a third of a
step's vector arithmetic; a diverging run grows geometrically and is caught within these steps,
a non-finite one stays non-finite)."""


def lissa(
    minibatch_operator: Callable[[torch.Tensor], MatVec],
    rhs: torch.Tensor,
    n_rows: int,
    scale: float,
    depth: int,
    batch: int,
    seed: int,
) -> torch.Tensor:
    """One LiSSA run: ``h_j = v + h_{j-1} - A_{B_j} h_{j-1} / scale``, output ``h_depth / scale``.

    ``rhs`` v is (d,) or (d, m) (columns iterate independently, with the same minibatches).
    ``minibatch_operator(rows)`` returns the damped operator A_B on the rows indexed by ``rows``;
    the minibatches B_j of ``batch`` rows are drawn without replacement, epoch by epoch, from
    ``n_rows`` rows with a ``torch.Generator`` seeded by ``seed``. Converges to ``A^{-1} v`` when
    A is PSD and ``scale > lambda_max(A_B)``. Raises ValueError on divergence: a non-finite
    iterate or a column norm above ``10 (j + 1) ||v||`` (a convergent run stays below
    ``(j + 1) ||v||``), checked every ``DIVERGENCE_CHECK_EVERY`` steps and at the last. Cost
    ``depth`` products on ``batch`` rows; the update runs in place on one (d, m) iterate.
    """
    gen = torch.Generator().manual_seed(seed)
    size = min(batch, n_rows)
    limit = 10 * torch.linalg.vector_norm(rhs, dim=0)
    h = rhs.clone()
    order = torch.randperm(n_rows, generator=gen)
    cursor = 0
    for step in range(1, depth + 1):
        if cursor + size > n_rows:
            order, cursor = torch.randperm(n_rows, generator=gen), 0
        rows = order[cursor : cursor + size]
        cursor += size
        product = minibatch_operator(rows)(h)
        h.add_(rhs).sub_(product, alpha=1.0 / scale)
        if step % DIVERGENCE_CHECK_EVERY and step < depth:
            continue
        norm = torch.linalg.vector_norm(h, dim=0)
        if not bool(torch.isfinite(norm).all()) or bool((norm > step * limit).any()):
            raise ValueError(
                f"LiSSA diverged at step {step} of {depth} (||h|| = {float(norm.max()):.3e}, "
                f"scale = {scale:.3e}): scale must exceed lambda_max of the damped minibatch "
                "curvature; pass a larger scale, a larger batch, more damping or "
                "curvature='ggn'"
            )
    return h / scale


Products = Literal["float32", "float64"]
"""The dtype of an estimator's curvature products where it offers the choice (``products``)."""


def product_dtype(products: str) -> torch.dtype:
    """torch's dtype for a ``products`` option; ValueError unless "float32" or "float64"."""
    if products not in ("float32", "float64"):
        raise ValueError(f"products must be 'float32' or 'float64', got {products!r}")
    return getattr(torch, products)


def _relative_residual(operator: MatVec, solved: torch.Tensor, rhs: torch.Tensor) -> float:
    """Worst ``||A x_j - b_j|| / ||b_j||`` over the columns of rhs (d, m), x = solved (d, m)."""
    error = torch.linalg.vector_norm(operator(solved) - rhs, dim=0)
    return float((error / torch.linalg.vector_norm(rhs, dim=0)).max())


def _target_rows(
    ctx: ScoringContext, source: GradientSource, model: nn.Module
) -> tuple[np.ndarray, torch.Tensor]:
    """Per-target-row gradients (ids (m,), (m, d) float64): the source's ``target_rows``, or
    (a source without it) computed here from ``ctx.target_x/target_y``."""
    reader = getattr(source, "target_rows", None)
    if reader is not None:
        ids, grads = reader(ctx.final.index)
        return np.asarray(ids, dtype=np.int64), grads.to(torch.float64)
    m = num_rows(ctx.target_x)
    ids = ctx.target_ids if ctx.target_ids is not None else np.arange(m, dtype=np.int64)
    grads = per_sample_gradients(model, ctx.target_x, ctx.target_y)
    return np.asarray(ids, dtype=np.int64), grads.to(torch.float64)


class _IterativeInfluence(Estimator):
    """Shared machinery: options, the curvature operator, scoring and pairwise scoring."""

    needs = Needs(checkpoints="final", gradients=True, model=True, full_gradients=True)

    def __init__(
        self, curvature: Curvature, damping: float | None, hvp_batch: int | None
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
        check_damping(damping)
        if hvp_batch is not None and hvp_batch < 1:
            raise ValueError(f"hvp_batch must be >= 1 or None, got {hvp_batch}")
        self.curvature = curvature
        self.damping = damping
        self.hvp_batch = hvp_batch
        self.damping_used: float | None = None
        """The damping of the last call (``damping``, or the relative default), without wd."""
        self._spectrum: dict[tuple, tuple[float, float]] = {}
        """(mean eigenvalue, negative curvature) per (curvature, seed, model and rows): score
        then pairwise, and every member of a model ensemble, compute them once."""

    def _problem(self, ctx: ScoringContext) -> _Problem:
        model = ctx.model_at(ctx.final)
        x, y = to_device(ctx.train_x, ctx.device), ctx.train_y.to(ctx.device)
        n = y.shape[0]
        if n == 0:
            raise ValueError(f"{self.name} needs at least one training row")
        if self.hvp_batch is not None and self.hvp_batch < n:
            rng = np.random.default_rng([ctx.seed, _SUBSET_STREAM])
            keep = torch.from_numpy(np.sort(rng.choice(n, self.hvp_batch, replace=False)))
            x, y = take(x, keep.to(y.device)), y[keep.to(y.device)]
        d = parameter_count(model)
        undamped = curvature_operator(model, x, y, kind=self.curvature)
        key = (self.curvature, ctx.seed, _digest(model, x, y))
        if key not in self._spectrum:
            mean = mean_eigenvalue(undamped, d, ctx.seed, device=ctx.device)
            negative = (negative_curvature(model, x, y, ctx.seed, device=ctx.device)
                        if self.damping is None else 0.0)
            self._spectrum[key] = (mean, negative)
        mean, negative = self._spectrum[key]
        self.damping_used = resolve(self.damping, lambda: relative_damping(mean, negative))
        shift = ctx.weight_decay + self.damping_used

        def operator(v: torch.Tensor) -> torch.Tensor:
            return undamped(v) + shift * v

        return _Problem(model, x, y, d, shift, operator, undamped, mean, key[2])

    @abstractmethod
    def _solver(self, ctx: ScoringContext, problem: _Problem) -> MatVec:
        """A map from right-hand sides (d, m) to approximate ``A^{-1}`` times them (d, m)."""

    def _check(self, g: torch.Tensor, d: int) -> None:
        if g.shape[-1] != d:
            raise ValueError(
                f"target gradient has {g.shape[-1]} entries, the model has d={d} parameters "
                "(projected gradients cannot be used here)"
            )

    def solve(self, ctx: ScoringContext, rhs: torch.Tensor) -> torch.Tensor:
        """``A^{-1} rhs`` for rhs (d, m) by this estimator's method, A the damped curvature of
        ctx's final model (what ``score`` applies to g_V): (d, m) float64."""
        return self._solve(ctx, self._problem(ctx), rhs)

    def relative_residual(self, ctx: ScoringContext, rhs: torch.Tensor) -> float:
        """Worst ``||A x - b|| / ||b||`` over the columns b of rhs (d, m), x = ``solve``, A
        applied exactly (float64 products): how far this estimator's solve is from exact."""
        problem = self._problem(ctx)
        rhs = rhs.to(torch.float64).to(ctx.device)
        return _relative_residual(problem.operator, self._solve(ctx, problem, rhs), rhs)

    def _solve(self, ctx: ScoringContext, problem: _Problem, rhs: torch.Tensor) -> torch.Tensor:
        self._check(rhs.T, problem.d)
        return self._solver(ctx, problem)(rhs.to(torch.float64).to(ctx.device))

    def score(self, ctx: ScoringContext) -> Attribution:
        """``score(z) = g_z . A^{-1} g_V`` for every train row: (n,) float64; no suspicion."""
        problem = self._problem(ctx)
        source = gradient_source(ctx, self.needs)
        g_v = source.target(ctx.final.index).to(torch.float64).to(ctx.device)
        self._check(g_v, problem.d)
        s = self._solver(ctx, problem)(g_v.unsqueeze(1)).squeeze(1)
        ids, (scores,) = stream(source, ctx.final.index, lambda g: (g.to(s.device) @ s,))
        return Attribution(sample_ids=ids, score=scores, suspicion=None)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``scores[i, t] = g_i . A^{-1} g_t`` for train row i and target row t: (n, m) float64."""
        return linear_pairwise(self, ctx)

    def pairwise_vectors(self, ctx: ScoringContext) -> PairwiseVectors:
        """``{final: (A^{-1} G_t^T)^T}``: every target row's gradient solved at once."""
        problem = self._problem(ctx)
        source = gradient_source(ctx, self.needs)
        target_ids, rows = _target_rows(ctx, source, problem.model)
        self._check(rows, problem.d)
        solved = self._solver(ctx, problem)(rows.to(ctx.device).T)  # (d, m)
        return PairwiseVectors(target_ids, {ctx.final.index: solved.T})


class ConjugateGradientInfluence(_IterativeInfluence):
    """Influence function solved by conjugate gradients on full-batch curvature products.

    ``s = (C + (wd + damping) I)^{-1} g_V`` by CG (warm start 0) to relative residual ``rtol``
    (default 1e-4: the ranking of a 1e-10 solve, docs/estimators.md) within ``maxiter``
    iterations (a RuntimeWarning reports a miss); CG needs an SPD system, so
    use the GGN or enough damping with the Hessian (non-positive curvature raises ValueError).
    ``hvp_batch``: a fixed seeded subset of that many train rows for the products (None: all).
    Score (n,) float64 as ``ExactInfluence``; suspicion None (it would need a solve per sample).
    Cost: up to ``maxiter`` curvature products (about two passes over the rows each), memory O(d)
    per right-hand side.
    """

    name = "if_cg"

    def __init__(
        self,
        curvature: Curvature = "ggn",
        damping: float | None = None,
        rtol: float = 1e-4,
        maxiter: int = 200,
        hvp_batch: int | None = None,
    ) -> None:
        super().__init__(curvature, damping, hvp_batch)
        if rtol <= 0 or maxiter < 1:
            raise ValueError(f"need rtol > 0 and maxiter >= 1, got {rtol}, {maxiter}")
        self.rtol = rtol
        self.maxiter = maxiter

    def _solver(self, ctx: ScoringContext, problem: _Problem) -> MatVec:
        d = problem.d

        def solve(rhs: torch.Tensor) -> torch.Tensor:
            width = block_width(d, self.maxiter)
            if rhs.shape[1] > 1 and width > 0:
                parts = [block_conjugate_gradient(problem.operator, rhs[:, s : s + width],
                                                  self.rtol, self.maxiter)
                         for s in range(0, rhs.shape[1], width)]
                solution = torch.cat([part[0] for part in parts], dim=1)
                iterations = max(part[1] for part in parts)
                residual = max(part[2] for part in parts)
            else:
                solution, iterations, residual = conjugate_gradient(
                    problem.operator, rhs, self.rtol, self.maxiter)
            if residual > self.rtol:
                warnings.warn(
                    f"if_cg stopped after {iterations} iterations at relative residual "
                    f"{residual:.2e} > rtol={self.rtol:.0e}; raise maxiter or damping",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return solution

        return solve


class LissaInfluence(_IterativeInfluence):
    """Influence function solved by LiSSA (torch-influence form, spec section 4).

    ``h_j = v + h_{j-1} - ((C_{B_j} + (wd + damping) I) h_{j-1}) / scale`` for j = 1..depth over
    fresh minibatches B_j of ``batch`` train rows, output ``h_depth / scale`` averaged over
    ``repeat`` runs (run r seeded by ``SeedSequence([ctx.seed, r])``). ``scale`` defaults to
    1.5 times a ``power_iters``-step power-iteration estimate of lambda_max of the damped
    full-batch curvature (seeded by ctx.seed). Divergence (non-finite or exploding ||h||)
    raises ValueError. ``hvp_batch`` restricts the row pool (and the power iteration) to a fixed
    seeded subset. The error shrinks like ``(1 - (wd + damping) / scale)^depth`` plus minibatch
    noise. ``products``: the dtype of the minibatch products ("float32", the default: their
    rounding, about 1e-7 relative, is far below the minibatch noise, and they cost half of
    float64's; the recursion itself stays float64) or "float64". Score (n,) float64 as
    ``ExactInfluence``; suspicion None. Cost: ``repeat * depth`` products on ``batch`` rows
    plus ``power_iters + 1`` full-batch products (float64).
    """

    name = "if_lissa"

    def __init__(
        self,
        curvature: Curvature = "ggn",
        damping: float | None = None,
        depth: int = 1000,
        batch: int = 128,
        repeat: int = 1,
        scale: float | None = None,
        power_iters: int = 20,
        hvp_batch: int | None = None,
        products: Products = "float32",
    ) -> None:
        super().__init__(curvature, damping, hvp_batch)
        if depth < 1 or batch < 1 or repeat < 1 or power_iters < 1:
            raise ValueError("depth, batch, repeat and power_iters must be >= 1")
        if scale is not None and scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.products = product_dtype(products)
        self.depth = depth
        self.batch = batch
        self.repeat = repeat
        self.scale = scale
        self.power_iters = power_iters

    def _scale(self, ctx: ScoringContext, problem: _Problem) -> float:
        if self.scale is not None:
            return self.scale
        top = power_iteration(
            problem.operator, problem.d, self.power_iters, seed=ctx.seed, device=ctx.device
        )
        if not top > 0:
            raise ValueError(
                f"power iteration gave lambda_max = {top:.3e} <= 0 for the damped curvature; "
                "LiSSA needs a positive definite system (use curvature='ggn' or more damping)"
            )
        return 1.5 * top

    def _solver(self, ctx: ScoringContext, problem: _Problem) -> MatVec:
        scale = self._scale(ctx, problem)

        def minibatch(rows: torch.Tensor) -> MatVec:
            rows = rows.to(problem.y.device)
            product = curvature_operator(
                problem.model,
                take(problem.x, rows),
                problem.y[rows],
                kind=self.curvature,
                shift=problem.shift,
            )
            return in_dtype(product, self.products)

        def solve(rhs: torch.Tensor) -> torch.Tensor:
            total = torch.zeros_like(rhs)
            for r in range(self.repeat):
                seed = int(np.random.SeedSequence([ctx.seed, r]).generate_state(1)[0])
                total += lissa(
                    minibatch, rhs, problem.y.shape[0], scale, self.depth, self.batch, seed
                )
            return total / self.repeat

        return solve


MAX_ITERATIONS = 1000
"""``if_arnoldi``'s largest Krylov dimension when ``n_iter`` is None."""

WHOLE_SPACE = MAX_ITERATIONS
"""Largest d for which ``if_arnoldi``'s default builds the whole space instead of a Krylov
space (``estimators.hvp.dense_eigenpairs``): the Krylov cap would be all of R^d."""

BLOCK = 16
"""Curvature products ``if_arnoldi`` computes at once (one batched call per block)."""

CHECK_EVERY = 64
"""Krylov dimensions between two convergence checks of the adaptive ``if_arnoldi``."""

STOP_PROBES = 4
"""Signed gradient sums whose solves decide when the adaptive ``if_arnoldi`` stops."""

CACHED_MODELS = 8
"""Eigenspaces ``if_arnoldi`` keeps (one per model and rows, oldest dropped): ``score`` then
``pairwise``, on each member of a model ensemble, run Arnoldi once."""


def _digest(model: nn.Module, x: Inputs, y: torch.Tensor) -> str:
    """sha256 of the model's parameters and state and of the curvature rows (x, y)."""
    digest = hashlib.sha256()
    rows = [x[k] for k in sorted(x)] if isinstance(x, Mapping) else [x]
    for tensor in [*model.state_dict().values(), *rows, y]:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _rademacher(rows: int, columns: int, seed: int, stream: int) -> torch.Tensor:
    """A (rows, columns) float64 matrix of seeded random signs (CPU)."""
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream])
                                            .generate_state(1)[0]))
    return torch.randint(0, 2, (rows, columns), generator=gen).to(torch.float64) * 2 - 1


class ArnoldiInfluence(_IterativeInfluence):
    """Influence function on the top eigenspace of the curvature, found by Arnoldi.

    Block Arnoldi (``estimators.hvp.arnoldi_eigenpairs``, ``BLOCK`` products at a time, seeded
    by ctx.seed, full re-orthogonalization) spans a Krylov space of the undamped curvature C;
    its Ritz pairs (lambda_i, u_i) with lambda_i > 0 are kept (the top ``rank``, default all),
    U their vectors, and with ``s = wd + damping``::

        score(z) = sum_i (g_V . u_i)(g_z . u_i) / (lambda_i + s) + (P g_V) . (P g_z) / (mu + s)

    with P = I - U U^T and mu = trace(P C P) / (d - k), the mean curvature left outside the
    kept directions, by 32 seeded Hutchinson probes projected onto the complement: the
    exact inverse of the damped approximation ``U Lambda U^T + mu P + s I``.
    ``complement=False`` drops the last term (the subspace-only estimate of dattri).

    Krylov dimension: ``n_iter`` products when given; by default (None) Arnoldi runs until the
    approximate inverse solves ``(C + s I) x = b`` to relative residual ``rtol`` for
    ``STOP_PROBES`` right-hand sides b shaped like the gradients it is applied to (random-sign
    sums of the training rows' gradients, ``estimators.hvp.signed_gradient_sums``), checked
    every ``CHECK_EVERY`` products, up to ``MAX_ITERATIONS`` (a RuntimeWarning reports a miss).
    A model with d <= ``WHOLE_SPACE`` parameters, where that cap is the whole space, gets
    the whole space by default: C from d products on the identity, diagonalized
    (``estimators.hvp.dense_eigenpairs``), cheaper than the Krylov run that may reach it. With
    ``n_iter = rank = d`` either is the exact damped solve. ``suspicion(z)`` is
    the same form with g_V = g_z, >= 0. ``hvp_batch``: a fixed seeded subset of train rows for
    the products. ``products``: the dtype of the Arnoldi and probe products ("float32", the
    default: their rounding, about 1e-7 of the largest eigenvalue, is far below the damping and
    the 1e-2 residual the default stops at, which is checked with float64 products; half the
    cost) or "float64"; the basis and everything after stay float64.
    Outputs (n,) float64. Cost: k products (k the dimension reached) plus
    ``STOP_PROBES`` gradient passes and one product of ``STOP_PROBES`` columns per check, then
    O(d k) per gradient; memory O(d min(d, MAX_ITERATIONS)) float64 by default.
    """

    name = "if_arnoldi"

    def __init__(
        self,
        curvature: Curvature = "ggn",
        damping: float | None = None,
        n_iter: int | None = None,
        rank: int | None = None,
        hvp_batch: int | None = None,
        complement: bool = True,
        rtol: float = 1e-2,
        products: Products = "float32",
    ) -> None:
        super().__init__(curvature, damping, hvp_batch)
        self.complement = complement
        self.products = product_dtype(products)
        if n_iter is not None and n_iter < 1:
            raise ValueError(f"n_iter must be >= 1 or None, got {n_iter}")
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1 or None, got {rank}")
        if not rtol > 0:
            raise ValueError(f"rtol must be > 0, got {rtol}")
        self.n_iter = n_iter
        self.rank = rank
        self.rtol = rtol
        self._cached: dict[tuple, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self._rest = 0.0
        """Mean eigenvalue of the curvature outside the kept directions, after a call."""
        self.krylov_dimension = 0
        """Products the last Arnoldi run took."""

    def _kept(self, values: torch.Tensor, vectors: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = torch.nonzero(values > 0).squeeze(1)[: self.rank]
        return values[keep], vectors[:, keep]

    def _eigenpairs(
        self, ctx: ScoringContext, problem: _Problem
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept eigenvalues (k,) and eigenvectors (d, k) of the undamped curvature; kept for
        later calls on the same model and rows (``CACHED_MODELS``)."""
        adaptive = self.n_iter is None
        n_iter = min(problem.d, MAX_ITERATIONS if adaptive else self.n_iter)
        key = (n_iter, self.rank, self.rtol if adaptive else None, self.curvature, ctx.seed,
               self.products, problem.shift, problem.digest)
        if key in self._cached:
            values, vectors, self._rest = self._cached[key]
            return values, vectors
        signs = _rademacher(problem.d, PROBES, ctx.seed, 0).to(ctx.device)
        undamped = in_dtype(problem.undamped, self.products)
        curved = undamped(signs)

        def complement_mean(vectors: torch.Tensor, curvature: torch.Tensor) -> float:
            """trace(P C P) / (d - k) from the probes, P = I - W W^T for the orthonormal kept
            directions W (d, k) with ``curvature`` = W^T C W (k, k) (0 when W spans R^d)."""
            k = vectors.shape[1]
            if not self.complement or k >= problem.d:
                return 0.0
            inside = vectors.T @ signs
            quadratic = ((signs * curved).sum() - 2 * (inside * (vectors.T @ curved)).sum()
                         + (inside * (curvature @ inside)).sum())
            return max(0.0, float(quadratic) / (PROBES * (problem.d - k)))

        # d products on the identity cost no more than a Krylov run that may reach all of
        # R^d, without its orthogonalization and checks, and give the exact eigenpairs
        dense = adaptive and problem.d <= WHOLE_SPACE
        residual = [0.0 if dense else float("nan")]
        stop = None
        if adaptive and not dense:
            rhs = self._stop_probes(ctx, problem)

            def stop(basis: torch.Tensor, projected: torch.Tensor) -> bool:
                if self.rank is None and int(torch.linalg.cholesky_ex(projected)[1]) == 0:
                    # every Ritz value > 0, so every pair is kept: solve in the basis
                    rest = complement_mean(basis, projected)
                    solved = self._apply_krylov(basis, projected, rest, problem.shift, rhs)
                else:
                    values, vectors = self._kept(*ritz_pairs(basis, projected))
                    rest = complement_mean(vectors, torch.diag(values))
                    solved = self._apply(values, vectors, rest, problem.shift, rhs)
                residual[0] = _relative_residual(problem.operator, solved, rhs)
                return residual[0] <= self.rtol

        if dense:
            values, vectors = dense_eigenpairs(undamped, problem.d, device=ctx.device)
        else:
            values, vectors = arnoldi_eigenpairs(
                undamped, problem.d, n_iter, seed=ctx.seed, device=ctx.device,
                block=BLOCK, stop=stop, check_every=CHECK_EVERY,
            )
        self.krylov_dimension = values.numel()
        if adaptive and not residual[0] <= self.rtol:
            warnings.warn(
                f"if_arnoldi stopped at Krylov dimension {values.numel()} with relative "
                f"residual {residual[0]:.2e} > rtol={self.rtol:.0e}; raise n_iter or damping",
                RuntimeWarning, stacklevel=3)
        values, vectors = self._kept(values, vectors)
        if values.numel() == 0:
            raise ValueError("if_arnoldi found no positive eigenvalue of the curvature")
        self._rest = complement_mean(vectors, torch.diag(values))
        if len(self._cached) >= CACHED_MODELS:
            self._cached.pop(next(iter(self._cached)))
        self._cached[key] = (values, vectors, self._rest)
        return values, vectors

    def stop_probes(self, ctx: ScoringContext) -> torch.Tensor:
        """The right-hand sides the adaptive stop solves: ``STOP_PROBES`` random-sign sums of
        the curvature rows' gradients (seeded by ctx.seed), (d, STOP_PROBES) float64."""
        return self._stop_probes(ctx, self._problem(ctx))

    def _stop_probes(self, ctx: ScoringContext, problem: _Problem) -> torch.Tensor:
        signs = _rademacher(problem.y.shape[0], STOP_PROBES, ctx.seed, 1).to(ctx.device)
        return signed_gradient_sums(problem.model, problem.x, problem.y, signs)

    def _apply(self, values: torch.Tensor, vectors: torch.Tensor, rest: float, shift: float,
               rhs: torch.Tensor) -> torch.Tensor:
        """The approximate inverse on rhs (d, m): ``U (Lambda + s)^-1 U^T + P / (rest + s)``."""
        inside, outside = self._weights(values, shift, rest)
        return vectors @ (inside.unsqueeze(1) * (vectors.T @ rhs)) + outside * rhs

    def _apply_krylov(self, basis: torch.Tensor, projected: torch.Tensor, rest: float,
                      shift: float, rhs: torch.Tensor) -> torch.Tensor:
        """``_apply`` with every Ritz pair kept, from the basis Q (d, k) and T = Q^T C Q
        (k, k) positive definite: ``Q (T + s)^-1 Q^T rhs + P rhs / (rest + s)``, no
        eigendecomposition (U (Lambda + s)^-1 U^T = Q (T + s)^-1 Q^T for U = Q Y)."""
        outside = self._outside(shift, rest)
        coordinates = basis.T @ rhs
        shifted = projected + shift * torch.eye(projected.shape[0], dtype=projected.dtype,
                                                device=projected.device)
        inside = torch.cholesky_solve(coordinates, torch.linalg.cholesky(shifted))
        return basis @ (inside - outside * coordinates) + outside * rhs

    def _weights(self, values: torch.Tensor, shift: float, rest: float
                 ) -> tuple[torch.Tensor, float]:
        """(weights of the kept directions minus that of the complement (k,), weight of their
        orthogonal complement): ``1/(lambda_i + shift)`` and ``1/(rest + shift)``
        (``complement``; rest = the complement's mean eigenvalue) or 0."""
        outside = self._outside(shift, rest)
        return 1.0 / (values + shift) - outside, outside

    def _outside(self, shift: float, rest: float) -> float:
        """Weight of the directions outside the kept ones: ``1/(rest + shift)``, or 0 without
        ``complement`` (or when that sum is not positive)."""
        total = rest + shift
        return 1.0 / total if self.complement and total > 0 else 0.0

    def _solver(self, ctx: ScoringContext, problem: _Problem) -> MatVec:
        values, vectors = self._eigenpairs(ctx, problem)
        rest = self._rest
        return lambda rhs: self._apply(values, vectors, rest, problem.shift, rhs)

    def score(self, ctx: ScoringContext) -> Attribution:
        """Scores and the self-influence: both (n,) float64."""
        problem = self._problem(ctx)
        values, vectors = self._eigenpairs(ctx, problem)
        inside, outside = self._weights(values, problem.shift, self._rest)
        source = gradient_source(ctx, self.needs)
        g_v = source.target(ctx.final.index).to(torch.float64).to(ctx.device)
        self._check(g_v, problem.d)
        weights = (g_v @ vectors) * inside  # (k,)
        g_v = g_v.to(vectors.device)

        def per_shard(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = g.to(vectors.device)
            projected = g @ vectors  # (m, k)
            return (projected @ weights + outside * (g @ g_v),
                    (projected * projected) @ inside + outside * (g * g).sum(dim=1))

        ids, (scores, self_influence) = stream(source, ctx.final.index, per_shard)
        return Attribution(sample_ids=ids, score=scores, suspicion=self_influence)
