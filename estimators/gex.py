"""GEX: influence as the co-movement of two losses over a geometric ensemble around the model.

Source: Kim, Kim and Yang, "GEX: A flexible method for approximating influence via Geometric
Ensemble", NeurIPS 2023. The paper reads the usual influence approximation
``g_z^T H^{-1} g_v`` as the average product of two *linearized* loss changes over parameters
drawn from the Laplace approximation N(theta*, H^{-1}), and replaces (i) the linearized losses
by the true ones and (ii) the Laplace samples by a geometric ensemble (members collected along
an SGD trajectory started at theta*)::

    GEX(z, V)  = (1/K) sum_k [l(z; theta_k) - l(z; theta*)] * [U(theta_k) - U(theta*)]
    self(z)    = (1/K) sum_k [l(z; theta_k) - l(z; theta*)]^2

theta* the final checkpoint, theta_1..theta_K the ensemble. Under the Laplace approximation and
linear losses, GEX(z, V) = g_z^T H^{-1} g_V, the project-sign influence (-I_up,loss of Koh and
Liang): positive when z's loss and V's loss move together, i.e. when up-weighting z lowers V's
loss. So the project score is ``+GEX(z, V)`` and the suspicion ``self(z)`` (the paper's
self-influence for mislabeled samples).

The ensemble (Sieve's choices; the paper's exact schedule is not reproduced): one plain-SGD
trajectory from theta* on ``mean cross-entropy + (ctx.weight_decay / 2) ||theta||^2`` with a
constant learning rate ``lr`` (default: the final checkpoint's lr), batches of
``ctx.batch_size`` training rows in a seeded order (``SeedSequence([ctx.seed, 7411])``); member
k is the parameter vector after ``k * steps_per_member`` steps (default: one epoch each).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from estimators.base import Attribution, Estimator, Needs, ScoringContext
from workloads.inputs import Inputs, call_model, cast_floating, num_rows, take

_STREAM = 7411  # the ensemble's random stream, apart from other users of ctx.seed


class GEX(Estimator):
    """Geometric-ensemble influence (module docstring for the formula and sign).

    Options: ``members`` K (default 20), ``steps_per_member`` (None: one epoch,
    ceil(n / ctx.batch_size) steps), ``lr`` (None: the final checkpoint's ``lr``),
    ``chunk_size`` rows per forward pass.

    Shapes: score and suspicion (n,), float64, aligned with ``ctx.train_ids``; ``pairwise``
    (n, m) with one column per target row (its single-row cost), columns summing to ``score``.
    Units: loss x target cost. Cost: K * steps_per_member SGD steps of one batch, then K + 1
    forward passes over the training and target rows (float64); no per-sample gradients, no
    curvature. Memory O(n K) for the loss table.
    """

    name = "gex"
    needs = Needs(checkpoints="final", model=True)

    def __init__(self, members: int = 20, steps_per_member: int | None = None,
                 lr: float | None = None, chunk_size: int = 1024) -> None:
        if members < 2:
            raise ValueError(f"members must be >= 2, got {members}")
        if steps_per_member is not None and steps_per_member < 1:
            raise ValueError(f"steps_per_member must be >= 1, got {steps_per_member}")
        if lr is not None and lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.members = members
        self.steps_per_member = steps_per_member
        self.lr = lr
        self.chunk_size = chunk_size

    def score(self, ctx: ScoringContext) -> Attribution:
        train, target = self._changes(ctx, per_row_target=False)
        ids = np.asarray(ctx.train_ids, dtype=np.int64)
        k = train.shape[1]
        return Attribution(sample_ids=ids, score=train @ target[0] / k,
                           suspicion=(train * train).sum(axis=1) / k)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not ctx.target.decomposable:
            raise ValueError(f"target {ctx.target.name!r} is not a sum over rows; single-row "
                             "attributions are undefined")
        train, target = self._changes(ctx, per_row_target=True)
        m = target.shape[0]
        target_ids = ctx.target_ids if ctx.target_ids is not None else np.arange(m)
        return (np.asarray(ctx.train_ids, dtype=np.int64), np.asarray(target_ids, dtype=np.int64),
                train @ target.T / train.shape[1])

    def ensemble(self, ctx: ScoringContext) -> list[torch.Tensor]:
        """The K members: flat float64 parameter vectors (d,) in ``model.parameters()`` order,
        after 1..K legs of ``steps_per_member`` SGD steps on the trajectory from theta*."""
        model = ctx.model_at(ctx.final).to(torch.float64)
        params = [p for p in model.parameters() if p.requires_grad]
        n = num_rows(ctx.train_x)
        batch = min(max(int(ctx.batch_size), 1), n)
        steps = self.steps_per_member or math.ceil(n / batch)
        lr = float(self.lr if self.lr is not None else ctx.final.lr)
        rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, _STREAM]))
        x, y = _as64(ctx.train_x), ctx.train_y
        order: list[int] = []
        members = []
        for _ in range(self.members):
            for _ in range(steps):
                if len(order) < batch:
                    order.extend(rng.permutation(n).tolist())
                rows = torch.as_tensor(order[:batch], device=y.device)
                del order[:batch]
                loss = F.cross_entropy(call_model(model, take(x, rows)), y[rows])
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads, strict=True):
                        p -= lr * (g + ctx.weight_decay * p)
            members.append(torch.cat([p.detach().reshape(-1) for p in params]).clone())
        return members

    def _changes(self, ctx: ScoringContext, per_row_target: bool) -> tuple[np.ndarray, np.ndarray]:
        """(n, K) training-loss changes and (1 or m, K) target-cost changes against theta*."""
        model = ctx.model_at(ctx.final).to(torch.float64)
        base_train = self._train_losses(model, ctx)
        base_target = self._target_costs(model, ctx, per_row_target)
        train, target = [], []
        for flat in self.ensemble(ctx):
            _load_flat(model, flat)
            train.append(self._train_losses(model, ctx) - base_train)
            target.append(self._target_costs(model, ctx, per_row_target) - base_target)
        return np.stack(train, axis=1), np.stack(target, axis=1)

    @torch.no_grad()
    def _train_losses(self, model: nn.Module, ctx: ScoringContext) -> np.ndarray:
        x, step = _as64(ctx.train_x), self.chunk_size
        out = [F.cross_entropy(call_model(model, take(x, slice(s, s + step))),
                               ctx.train_y[s:s + step], reduction="none")
               for s in range(0, num_rows(x), step)]
        return torch.cat(out).cpu().numpy()

    @torch.no_grad()
    def _target_costs(self, model: nn.Module, ctx: ScoringContext, per_row: bool) -> np.ndarray:
        x, y = _as64(ctx.target_x), ctx.target_y
        logits = call_model(model, x)
        if not per_row:
            return np.array([float(ctx.target.cost(logits, y))])
        return np.array([float(ctx.target.cost(logits[j:j + 1], y[j:j + 1]))
                         for j in range(num_rows(x))])


def _load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    start = 0
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(flat[start:start + p.numel()].view_as(p))
            start += p.numel()


def _as64(x: Inputs) -> Inputs:
    return cast_floating(x, torch.float64)
