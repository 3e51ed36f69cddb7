"""Influence functions with an exact, explicitly built curvature matrix (Koh & Liang 2017).

Spec sections 4 and 13. With H the curvature of the mean training loss plus weight decay and
damping, ``score(z) = g_V^T H^{-1} g_z``. Removing z moves theta by about ``+(1/n) H^{-1} g_z``,
so ``score(z) ~ n * [U(theta_without_z) - U(theta)]`` for the summed target loss U.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, jacrev, vmap

from estimators._streaming import gradient_source, linear_pairwise, stream, target_vectors
from estimators.base import Attribution, Estimator, Needs, PairwiseVectors, ScoringContext
from estimators.damping import (
    check_damping,
    mean_eigenvalue,
    negative_curvature,
    relative_damping,
    resolve,
)
from estimators.per_sample import flat_parameters, parameter_count, parameter_order
from workloads.inputs import Inputs, call_functional, cast_floating, num_rows, take, unsqueeze_rows

Curvature = Literal["ggn", "hessian"]

JACOBIAN_CHUNK = 2**21
"""Largest logit-Jacobian chunk (rows x classes x d floats, 16 MiB in float64) that
``curvature_matrix`` builds at once for the GGN; the rank-(rows x classes) updates of the d x d
matrix stay large enough for an efficient matrix product."""
CURVATURES: tuple[str, ...] = ("ggn", "hessian")


def curvature_matrix(
    model: nn.Module,
    x: Inputs,
    y: torch.Tensor,
    kind: Curvature = "ggn",
    chunk_size: int = 256,
) -> torch.Tensor:
    """Curvature of the mean cross-entropy ``(1/n) sum_i l(x_i, y_i; theta)``: (d, d), float64.

    ``kind="ggn"``: Gauss-Newton ``(1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i``, with J_i (C, d)
    the logit Jacobian of row i and p_i its softmax; always PSD. ``kind="hessian"``: the exact
    Hessian (may be indefinite for non-convex models). No weight-decay term is included.

    ``model`` maps inputs (``workloads.inputs``) to logits (n, C) and should be in eval mode; it is
    copied to float64 for the computation. Parameters follow ``parameter_order(model)``. Rows are
    processed in chunks of at most ``chunk_size``.
    """
    if kind not in CURVATURES:
        raise ValueError(f"unknown curvature {kind!r}; expected one of {CURVATURES}")
    n = y.shape[0]
    if n == 0:
        raise ValueError("curvature_matrix needs at least one training row")
    model64 = copy.deepcopy(model).to(torch.float64)
    names = parameter_order(model64)
    params = {name: p.detach() for name, p in model64.named_parameters() if name in names}
    buffers = {name: b.detach() for name, b in model64.named_buffers()}
    x = cast_floating(x, torch.float64)
    d = sum(p.numel() for p in params.values())
    curvature = torch.zeros(d, d, dtype=torch.float64, device=y.device)

    def logits_of(p: dict[str, torch.Tensor], rows: Inputs) -> torch.Tensor:
        return call_functional(model64, (p, buffers), rows)

    if kind == "ggn":
        n_classes = logits_of(params, take(x, slice(0, 1))).shape[1]
        rows_per_chunk = max(1, min(chunk_size, JACOBIAN_CHUNK // (n_classes * d)))

        def logits_one(p: dict[str, torch.Tensor], row: Inputs) -> torch.Tensor:
            return logits_of(p, unsqueeze_rows(row)).squeeze(0)

        jacobian = vmap(jacrev(logits_one), in_dims=(None, 0))
        for start in range(0, n, rows_per_chunk):
            rows = take(x, slice(start, start + rows_per_chunk))
            m_rows = num_rows(rows)
            jac = jacobian(params, rows)
            j = torch.cat([jac[name].reshape(m_rows, n_classes, -1) for name in names], 2)
            del jac  # two chunk-sized temporaries alive at once (j and B^T J), not three
            prob = torch.softmax(logits_of(params, rows), dim=1)  # (m, C)
            root = prob.sqrt()
            # H_out = diag(p) - p p^T = B B^T with B = diag(sqrt p) - p sqrt(p)^T
            b = torch.diag_embed(root) - prob.unsqueeze(2) * root.unsqueeze(1)  # (m, C, C)
            m = (b.transpose(1, 2) @ j).reshape(-1, d)  # rows of B^T J, (m*C, d)
            curvature.addmm_(m.T, m)  # in place: no d x d temporary per chunk
    else:
        flat0 = flat_parameters(model64)
        shapes = [params[name].shape for name in names]
        sizes = [params[name].numel() for name in names]
        rows_per_chunk = max(1, min(chunk_size, 2**20 // d))

        def chunk_loss(flat: torch.Tensor, rows: Inputs, labels: torch.Tensor) -> torch.Tensor:
            pieces = torch.split(flat, sizes)
            p = {name: t.view(s) for name, t, s in zip(names, pieces, shapes, strict=True)}
            return F.cross_entropy(logits_of(p, rows), labels, reduction="sum")

        hess = hessian(chunk_loss)
        with warnings.catch_warnings():
            # torch's forward-mode AD loads TorchScript decompositions on first use and warns
            warnings.filterwarnings("ignore", "`torch.jit.script`", DeprecationWarning)
            for start in range(0, n, rows_per_chunk):
                stop = start + rows_per_chunk
                curvature += hess(flat0, take(x, slice(start, stop)), y[start:stop])
    return curvature.div_(n)  # in place: no second d x d matrix


def damped_cholesky(curvature: torch.Tensor, shift: float, overwrite: bool = False) -> torch.Tensor:
    """Lower Cholesky factor L (d, d) of ``(H + H^T)/2 + shift * I``, in float64.

    Only the lower triangle is symmetrized (block by block) and factored, in one d x d working
    copy; ``overwrite=True`` uses ``curvature``'s own storage instead when it is float64 (no
    d x d copy: ``curvature`` then holds L, as L^T when it was row-major). A row-major matrix is
    factored through its column-major transposed view, which LAPACK factors without a copy; L
    is then that view (strides (1, d)). Raises ValueError when that matrix is not positive
    definite (e.g. an indefinite Hessian with too little damping).
    """
    in_place = overwrite and curvature.dtype == torch.float64
    h = curvature if in_place else curvature.to(torch.float64, copy=True)
    if h.is_contiguous():  # LAPACK factors a column-major matrix in place; a row-major one
        h = h.mT  # through a d x d copy. The transposed view of the (symmetrized) matrix is it.
    d = h.shape[0]
    for start in range(0, d, 256):  # lower <- (lower + upper^T) / 2, a (256, stop) block at once
        stop = min(start + 256, d)
        upper = h[:stop, start:stop].mT.clone()
        h[start:stop, :stop].add_(upper).mul_(0.5)
    h.diagonal().add_(shift)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(h, out=(h, info))  # in place; the upper triangle is zeroed
    if int(info) != 0:
        where = (f"its leading minor of order {int(info)} is not positive" if in_place else
                 f"smallest eigenvalue {_lowest_eigenvalue(curvature) + shift:.3e}")
        raise ValueError(
            f"damped curvature is not positive definite ({where} after adding {shift:.3e} * I); "
            "increase damping or use curvature='ggn'"
        )
    return h


def _lowest_eigenvalue(curvature: torch.Tensor) -> float:
    h = curvature.to(torch.float64)
    return torch.linalg.eigvalsh((h + h.mT) / 2)[0].item()


class ExactInfluence(Estimator):
    """Influence function with the curvature built explicitly and solved by Cholesky.

    ``H_total = curvature + (ctx.weight_decay + damping) * I`` where ``curvature`` is the GGN
    (default, PSD) or the exact Hessian of the mean training loss at theta_final, and
    ``ctx.weight_decay`` is lam in the objective ``mean loss + (lam/2) ||theta||^2``.
    ``damping`` None (default): max(0.1 x the mean eigenvalue of ``curvature``, minus the
    Hessian's smallest eigenvalue), estimated as the matrix-free estimators do, so they agree
    (``estimators.damping``); a number: that absolute value (0: the undamped solve).

    ``score(z) = g_z . s`` with ``s = H_total^{-1} g_V`` (g_V the summed target-loss gradient),
    so ``score(z) ~ n * [U(theta_without_z) - U(theta)]`` (positive = beneficial, units of target
    loss times n). ``suspicion(z) = g_z^T H_total^{-1} g_z >= 0`` (self-influence). Outputs (n,),
    float64, in the gradient source's shard order. Memory O(d^2), time O(n d^2 + d^3); refuses
    models with more than ``max_params`` trainable parameters.
    """

    name = "if_exact"
    needs = Needs(checkpoints="final", gradients=True, model=True, full_gradients=True)

    def __init__(
        self, curvature: Curvature = "ggn", damping: float | None = None, max_params: int = 6000
    ) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"unknown curvature {curvature!r}; expected one of {CURVATURES}")
        check_damping(damping)
        self.curvature = curvature
        self.damping = damping
        self.max_params = max_params
        self.damping_used: float | None = None
        """The damping of the last solve (``damping``, or the relative default), without wd."""
        self._cached: tuple[tuple, torch.Tensor, float] | None = None

    def _factor(self, ctx: ScoringContext) -> torch.Tensor:
        """Cholesky factor of H_total at the final checkpoint; kept for the next call on the
        same checkpoint and training set (``score`` then ``pairwise`` factor once)."""
        digest = hashlib.sha256()
        train_x = ctx.train_x.values() if isinstance(ctx.train_x, dict) else [ctx.train_x]
        for tensor in [*ctx.final.load().values(), *train_x, ctx.train_y]:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        key = (self.curvature, self.damping, ctx.weight_decay, digest.hexdigest())
        if self._cached is not None and self._cached[0] == key:
            self.damping_used = self._cached[2]
            return self._cached[1]
        model = ctx.model_at(ctx.final)
        d = parameter_count(model)
        refused = self.refusal(d)
        if refused is not None:
            raise ValueError(refused)
        h = curvature_matrix(model, ctx.train_x, ctx.train_y, kind=self.curvature)
        self.damping_used = resolve(self.damping, lambda: relative_damping(
            mean_eigenvalue(lambda v: h @ v, d, ctx.seed, device=h.device),
            negative_curvature(model, ctx.train_x, ctx.train_y, ctx.seed, device=h.device),
        ))
        factor = damped_cholesky(h, ctx.weight_decay + self.damping_used, overwrite=True)
        self._cached = (key, factor, self.damping_used)
        return factor

    def refusal(self, num_params: int) -> str | None:
        d = num_params
        if d <= self.max_params:
            return None
        gib = d * d * 8 / 2**30
        return (f"if_exact builds a dense d x d curvature matrix ({gib:.1f} GiB at d={d} trainable "
                f"parameters) and d > max_params={self.max_params}: set max_params >= {d}, or "
                "use if_cg")

    def score(self, ctx: ScoringContext) -> Attribution:
        factor = self._factor(ctx)
        d = factor.shape[0]
        source = gradient_source(ctx, self.needs)
        g_v = source.target(ctx.final.index).to(torch.float64).to(factor.device)
        if g_v.shape != (d,):
            raise ValueError(f"target gradient has shape {tuple(g_v.shape)}, model has d={d}")
        s = torch.cholesky_solve(g_v.unsqueeze(1), factor).squeeze(1)

        def per_shard(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g = g.to(factor.device)
            w = torch.linalg.solve_triangular(factor, g.T, upper=False)  # L^{-1} g_z^T, (d, m)
            return g @ s, (w * w).sum(dim=0)

        ids, (scores, self_influence) = stream(source, ctx.final.index, per_shard)
        return Attribution(sample_ids=ids, score=scores, suspicion=self_influence)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``G_train H_total^{-1} G_t^T``: (train ids, target ids, (n, m)), same sign."""
        return linear_pairwise(self, ctx)

    def pairwise_vectors(self, ctx: ScoringContext) -> PairwiseVectors:
        """``{final: G_t H_total^{-1}}`` (H_total symmetric): one Cholesky solve per target."""
        factor = self._factor(ctx)

        def solve(rows: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(rows.to(factor.device).T, factor).T

        index = ctx.final.index
        target_ids, rows = target_vectors(gradient_source(ctx, self.needs), index, solve)
        return PairwiseVectors(target_ids, {index: rows})
