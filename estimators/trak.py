"""TRAK: attribution with a linearized model in a randomly projected gradient space.

Source: Park et al., arXiv 2303.14186, and the official code (MadryLab/trak: ``traker.py``
``finalize_scores``, ``score_computers.py``, ``modelout_functions.py``); spec section 5.

Model output: the margin ``f(z) = logit_y - logsumexp_{j != y} logit_j`` (= log(p / (1 - p)),
the signed logit for one-output models). Since the cross-entropy is ``l = log(1 + e^{-f})``,
``grad l(z) = -Q(z) grad f(z)`` with ``Q = 1 - p(y | x) = sigmoid(-f)``.

Per ensemble member m (a model and one of its checkpoints), with the projector P_m:
``phi(z) = P_m^T grad f(z; theta_m) / sqrt(d)`` (k,), ``Phi_m`` (n, k) the train features,
``K_m = Phi_m^T Phi_m + lambda I`` and ``tau_m(t, i) = phi(t)^T K_m^{-1} phi(z_i)``. Ensemble
(as the official code): ``tau(t, i) = mean_m tau_m(t, i) * mean_m Q_m(z_i)``.

Sign: positive when training on z_i raises the target's margin. The margin is a reward, and by
the reward rule of spec section 0, ``-grad R^T H^{-1} grad l_i = Q_i grad f_t^T H^{-1} grad f_i``,
so TRAK's own sign is the project sign (positive = beneficial); no flip.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.func import grad, vmap

from estimators.base import Attribution, Checkpoint, Estimator, Needs, ScoringContext
from estimators.factorized import FactorizedProjector
from estimators.per_sample import parameter_count, parameter_order
from estimators.projection import KINDS, ProjectionKind, Projector
from estimators.targets import SummedLoss
from workloads.inputs import (
    Inputs,
    call_functional,
    call_model,
    num_rows,
    take,
    to_device,
    unsqueeze_rows,
)


def margins(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TRAK's model output per row: (m,) from logits (m, C) and labels (m,).

    C >= 2: ``logit_y - logsumexp_{j != y} logit_j``; C == 1 (a single logit for the positive
    class): ``(2y - 1) * logit``. In both cases ``p(y | x) = sigmoid(margin)``.
    """
    if logits.shape[1] == 1:
        return (2 * y.to(logits.dtype) - 1) * logits[:, 0]
    own = torch.arange(logits.shape[1], device=logits.device) == y.unsqueeze(1)
    correct = (logits * own).sum(dim=1)
    others = logits.masked_fill(own, float("-inf"))
    return correct - torch.logsumexp(others, dim=1)


def margin_gradients(
    model: nn.Module, x: Inputs, y: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """Per-sample gradients of ``margins``: (m, d) in ``parameter_order(model)``, model dtype.

    Uses ``torch.func`` (vmap of grad of a functional call); put the model in eval mode first.
    """
    names = parameter_order(model)
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def margin_one(p: dict, xi: Inputs, yi: torch.Tensor) -> torch.Tensor:
        logits = call_functional(model, (p, buffers), unsqueeze_rows(xi))
        return margins(logits, yi.unsqueeze(0)).squeeze(0)

    per_sample = vmap(grad(margin_one), in_dims=(None, 0, 0), chunk_size=chunk_size)
    grads = per_sample(params, x, y)
    return torch.cat([grads[n].reshape(y.shape[0], -1) for n in names], dim=1)


class TRAK(Estimator):
    """TRAK scores against the target's summed margin (spec section 5).

    Options: ``k`` projection dimension (default 512); ``kind`` "rademacher", "gaussian" or
    "factorized" (LoGra's per-layer Kronecker projection, ``estimators.factorized``, with
    ``k_in`` x ``k_out`` per layer and Rademacher entries: the margin gradients are never
    formed, and ``k`` is then the factorized width, not capped);
    ``regularization`` r, the kernel ridge ``lambda = r * trace(Phi^T Phi) / k`` (default 1e-6,
    relative, so the result does not depend on the feature scale); ``checkpoints`` "final"
    (one member per trained model: ``ctx.checkpoints`` and each of ``ctx.extra_models``) or
    "all" (every checkpoint of every model is a member; checkpoints of one model share P);
    ``chunk_size`` rows per vmap call (capped at 2^27 gradient entries, ~1 GiB in float64;
    with a large model each chunk regenerates P unless P fits the projector cache);
    ``max_rows`` the projector's tile height.

    Dimension used: ``k_eff = min(k, n // 2)`` (with k >= n the kernel is singular and every
    train point has leverage 1, i.e. the projected linear model interpolates); when
    ``d <= k_eff`` no projection is made (phi = grad f: for any injective projection the scores
    are the same up to lambda, so this is its exact limit). Member m = model index
    ``model_id`` (0 for ``ctx.checkpoints``, j for ``ctx.extra_models[j - 1]``) uses
    ``Projector(k_eff, seed=ctx.seed, model_id=model_id)``; the features are
    ``P^T grad f / sqrt(d)`` as in the official code (a positive rescale; with the relative
    lambda it changes nothing).

    ``score(i) = sum_t tau(t, i)`` over the target rows t, computed as
    ``mean_m(Phi_m K_m^{-1} sum_t phi_m(t)) * mean_m Q_m`` (n,), float64, aligned with
    ``ctx.train_ids``; positive = training on i raises the target margin = beneficial. For a
    target other than the summed loss (``ctx.target``, a cost U) the target feature is
    ``-P^T grad U / sqrt(d)`` (the cost rule of spec section 0 with ``grad l = -Q grad f``).
    ``suspicion(i) = tau(i, i) = mean_m(phi_m(i)^T K_m^{-1} phi_m(i)) * mean_m Q_m(i) >= 0``:
    TRAK's self-influence, the leverage of i in the projected linear model times its loss
    weight 1 - p(y_i | x_i) (mislabeled points are poorly fit and high-leverage).

    Cost per member: n + n_targets per-sample margin gradients (vmap), their projection
    O((n + n_targets) d k) plus d k random draws, O(n k^2 + k^3) for the kernel and its
    Cholesky factor, O(n k n_targets) for pairwise scores. Memory: n k feature floats per member
    (float64 for float64 models, else float32) and the projector's tile.
    """

    name = "trak"
    needs = Needs(checkpoints="final", model=True, models=True)

    def __init__(
        self,
        k: int = 512,
        kind: ProjectionKind | Literal["factorized"] = "rademacher",
        regularization: float = 1e-6,
        checkpoints: Literal["final", "all"] = "final",
        chunk_size: int = 256,
        max_rows: int = 2**16,
        k_in: int = 32,
        k_out: int = 16,
    ) -> None:
        if k < 1 or k_in < 1 or k_out < 1:
            raise ValueError(f"k, k_in and k_out must be >= 1, got {k}, {k_in}, {k_out}")
        if kind not in (*KINDS, "factorized"):
            raise ValueError(f"unknown projection kind {kind!r}; expected one of "
                             f"{(*KINDS, 'factorized')}")
        if regularization < 0:
            raise ValueError(f"regularization must be >= 0, got {regularization}")
        if checkpoints not in ("final", "all"):
            raise ValueError(f'checkpoints must be "final" or "all", got {checkpoints!r}')
        if chunk_size < 1 or max_rows < 1:
            raise ValueError("chunk_size and max_rows must be >= 1")
        self.k = k
        self.kind = kind
        self.regularization = regularization
        self.checkpoints = checkpoints
        self.chunk_size = chunk_size
        self.max_rows = max_rows
        self.k_in, self.k_out = k_in, k_out
        self.needs = Needs(checkpoints=checkpoints, model=True, models=True)
        self.metadata: dict[str, Any] = {}
        """Filled by the last ``score``/``pairwise``: k used, lambdas, projector metadata."""

    def score(self, ctx: ScoringContext) -> Attribution:
        tau, q, leverage = self._ensemble(ctx, pairwise=False)
        return Attribution(
            sample_ids=np.asarray(ctx.train_ids, dtype=np.int64),
            score=(tau[:, 0] * q).cpu().numpy(),
            suspicion=(leverage * q).cpu().numpy(),
        )

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``tau(t, i)`` for every train row i and target row t: (train ids (n,), target ids
        (m,), (n, m) float64), project sign; the columns sum to ``score`` (summed-loss target)."""
        tau, q, _ = self._ensemble(ctx, pairwise=True)
        m = num_rows(ctx.target_x)
        target_ids = ctx.target_ids if ctx.target_ids is not None else np.arange(m)
        return (
            np.asarray(ctx.train_ids, dtype=np.int64),
            np.asarray(target_ids, dtype=np.int64),
            (tau * q.unsqueeze(1)).cpu().numpy(),
        )

    def members(self, ctx: ScoringContext) -> list[tuple[int, Checkpoint]]:
        """The ensemble members (model_id, checkpoint), in order."""
        models = [ctx.checkpoints, *ctx.extra_models]
        chosen: list[tuple[int, Checkpoint]] = []
        for model_id, checkpoints in enumerate(models):
            if not checkpoints:
                raise ValueError(f"model {model_id} of the ensemble has no checkpoints")
            picked = checkpoints if self.checkpoints == "all" else checkpoints[-1:]
            chosen.extend((model_id, ckpt) for ckpt in picked)
        return chosen

    def _ensemble(
        self, ctx: ScoringContext, pairwise: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mean_m tau_m (n, 1) or (n, n_targets), mean_m Q_m (n,), mean_m leverage_m (n,)."""
        members = self.members(ctx)
        tau_sum = q_sum = lev_sum = None
        self.metadata = {"method": self.name, "members": [], "convention": "positive=beneficial"}
        projectors: dict[int, Projector | FactorizedProjector | None] = {}
        for model_id, ckpt in members:
            model = ctx.model_at(ckpt)
            if model_id not in projectors:
                projectors[model_id] = self._projector(ctx, model, model_id)
            tau, q, lev, info = self._member(ctx, model, projectors[model_id], pairwise)
            info.update(model_id=model_id, checkpoint=ckpt.index)
            self.metadata["members"].append(info)
            tau_sum = tau if tau_sum is None else tau_sum + tau
            q_sum = q if q_sum is None else q_sum + q
            lev_sum = lev if lev_sum is None else lev_sum + lev
        count = len(members)
        return tau_sum / count, q_sum / count, lev_sum / count

    def _projector(self, ctx: ScoringContext, model: nn.Module,
                   model_id: int) -> Projector | FactorizedProjector | None:
        """Projector of one trained model, or None when the exact gradients are small enough."""
        if self.kind == "factorized":
            return FactorizedProjector.for_model(model, self.k_in, self.k_out, ctx.seed,
                                                 model_id=model_id, block_rows=self.chunk_size)
        d, n = parameter_count(model), num_rows(ctx.train_x)
        k_eff = min(self.k, max(1, n // 2))
        if d <= k_eff:
            return None
        precision = "float64" if next(model.parameters()).dtype == torch.float64 else "float32"
        return Projector.for_model(
            model, k_eff, ctx.seed, self.kind, model_id=model_id, max_rows=self.max_rows,
            precision=precision,
        )

    def _features(
        self, model: nn.Module, projector: Projector | FactorizedProjector | None,
        x: Inputs, y: torch.Tensor,
    ) -> torch.Tensor:
        """phi rows (m, k): projected margin gradients / sqrt(d), or the gradients themselves."""
        d = parameter_count(model)
        dtype = next(model.parameters()).dtype
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if isinstance(projector, FactorizedProjector):
            phi = projector.features(model, x, y, cost=margins, dtype=out_dtype)
            return phi * math.sqrt(projector.k / d)
        rows = max(1, min(self.chunk_size, 2**27 // d))
        pieces = []
        for start in range(0, y.shape[0], rows):
            g = margin_gradients(model, take(x, slice(start, start + rows)),
                                 y[start : start + rows], rows)
            pieces.append(self._map(projector, g, d, out_dtype))
        if not pieces:
            k = d if projector is None else projector.k
            return torch.zeros(0, k, dtype=out_dtype, device=y.device)
        return torch.cat(pieces)

    @staticmethod
    def _map(
        projector: Projector | FactorizedProjector | None, g: torch.Tensor, d: int,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        if projector is None:
            return g.to(out_dtype)
        return projector.project(g, dtype=out_dtype) * math.sqrt(projector.k / d)

    def _target_features(
        self, ctx: ScoringContext, model: nn.Module,
        projector: Projector | FactorizedProjector | None, pairwise: bool
    ) -> torch.Tensor:
        """Target features (k, 1) summed, or (k, n_targets) per row, float64."""
        x, y = to_device(ctx.target_x, ctx.device), ctx.target_y.to(ctx.device)
        if pairwise:
            return self._features(model, projector, x, y).to(torch.float64).T
        d = parameter_count(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if isinstance(ctx.target, SummedLoss):
            total = torch.zeros(d, dtype=params[0].dtype, device=ctx.device)
            for start in range(0, y.shape[0], self.chunk_size):
                rows = slice(start, start + self.chunk_size)
                value = margins(call_model(model, take(x, rows)), y[rows]).sum()
                total += torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])
        else:
            total = -ctx.target.gradient(model, x, y).to(params[0].dtype)
        phi = self._map(projector, total.unsqueeze(0), d, torch.float64)
        return phi.to(torch.float64).T

    def _member(
        self, ctx: ScoringContext, model: nn.Module,
        projector: Projector | FactorizedProjector | None, pairwise: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        """One member's tau (n, 1 or n_targets), Q (n,), leverage (n,) (all float64)."""
        x, y = to_device(ctx.train_x, ctx.device), ctx.train_y.to(ctx.device)
        phi = self._features(model, projector, x, y)
        k = phi.shape[1]
        kernel = torch.zeros(k, k, dtype=torch.float64, device=phi.device)
        for start in range(0, phi.shape[0], 4096):
            block = phi[start : start + 4096].to(torch.float64)
            kernel += block.T @ block
        trace = float(torch.trace(kernel))
        lam = self.regularization * trace / k if trace > 0 else 1.0
        kernel += lam * torch.eye(k, dtype=torch.float64, device=phi.device)
        factor, info = torch.linalg.cholesky_ex(kernel)
        if int(info) != 0:
            raise ValueError(
                f"TRAK kernel is not positive definite with lambda={lam:.3e}; raise regularization"
            )
        target = self._target_features(ctx, model, projector, pairwise)
        solved = torch.cholesky_solve(target, factor)  # K^{-1} phi_t, (k, m)
        tau = torch.empty(phi.shape[0], target.shape[1], dtype=torch.float64, device=phi.device)
        leverage = torch.zeros(phi.shape[0], dtype=torch.float64, device=phi.device)
        for start in range(0, phi.shape[0], 4096):
            block = phi[start : start + 4096].to(torch.float64)
            tau[start : start + 4096] = block @ solved
            if not pairwise:
                w = torch.linalg.solve_triangular(factor, block.T, upper=False)
                leverage[start : start + 4096] = (w * w).sum(dim=0)
        with torch.no_grad():
            step = self.chunk_size
            f = [margins(call_model(model, take(x, slice(s, s + step))), y[s : s + step])
                 for s in range(0, y.shape[0], step)]
            q = torch.sigmoid(-torch.cat(f)).to(torch.float64)
        info = {
            "k": k,
            "projected": projector is not None,
            "lambda": lam,
            "projector": None if projector is None else projector.metadata(),
        }
        return tau, q, leverage, info
