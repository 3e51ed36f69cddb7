"""The estimator the score stage runs: the configured one, averaged over ``train.models``.

With ``train.models = K > 1`` every estimator that reads a trained model is wrapped in
``estimators.model_ensemble.ModelEnsemble`` (mean of its scores over the K models); ``random``
reads none and ``trak`` combines the models itself, so both run as configured. With K = 1 the
configured estimator runs unwrapped (bit-identical to a run without this module).

The gradients stage stores per-sample gradients of model 0 only. Models 1..K-1 get theirs in
memory, one model at a time per process, in the form that stage stores them
(``member_gradients``); for the streamed train x test attributions they are computed block by
block as they are read (``streamed_member_gradients``), so no model holds n x d. Members may be
computed in worker processes beside the stage's (``tasks.member_pool``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import torch
from prefect import get_run_logger

from estimators.base import Checkpoint, Estimator, ScoringContext
from estimators.factorized import make_projector
from estimators.gradient_source import InMemoryGradients
from estimators.model_ensemble import (
    GradientsFor,
    MemberRunner,
    ModelEnsemble,
    averages_over_models,
)
from estimators.per_sample import per_sample_gradients
from estimators.registry import make_estimator
from storage.gradient_shards import STORED_DTYPES
from tasks.config import Config
from workloads.inputs import take, to_device


def scored_estimator(config: Config, name: str,
                     runner: Callable[[Callable[[int, int], None]], MemberRunner] | None = None
                     ) -> Estimator:
    """The configured estimator ``name``; averaged over the models when ``train.models > 1``,
    with ``runner(announce)`` (``tasks.member_pool``) computing members beside this process."""
    estimator = make_estimator(name, **config.estimator(name).options)
    if config.train.models == 1 or not averages_over_models(estimator):
        return estimator

    def announce(member: int, count: int, where: str = "") -> None:
        get_run_logger().info("score: %s on model %d (%d of %d)%s", name, member, member + 1,
                              count, where)

    def announce_worker(member: int, count: int) -> None:
        announce(member, count, " done in a worker process")

    return ModelEnsemble(estimator, member_gradients(config), announce,
                         streamed_member_gradients(config),
                         runner(announce_worker) if runner is not None else None)


def member_gradients(config: Config) -> GradientsFor:
    """Per-sample gradients of an extra model's context, as the gradients stage would store them:
    train rows, target rows (when the target is a sum over rows) and the target gradient, at the
    final or every checkpoint, projected with the stage's projector (``gradients.projection``,
    same seed and kind, so the same P as model 0) and rounded to ``gradients.dtype``; rows are
    float32 (what stored shards read back as), the target float64.

    Memory, for one model at a time (released once it is scored): n x d floats per checkpoint
    read (the final, or all), plus n x k float32 per checkpoint while projecting.
    """

    def compute(ctx: ScoringContext, checkpoints: Literal["final", "all"]) -> InMemoryGradients:
        form = _StoredForm(config, ctx)
        full = InMemoryGradients.from_context(ctx, checkpoints=checkpoints,
                                              shard_size=config.gradients.shard_size)
        indices = full.checkpoints
        target_rows = None
        if full.has_target_rows:
            target_rows = {c: form.rows(full.target_rows(c)[1]) for c in indices}
        return InMemoryGradients(
            full.train_ids,
            {c: form.rows(full.train_matrix(c)) for c in indices},
            {c: form.target(full.target(c)) for c in indices},
            shard_size=config.gradients.shard_size,
            target_rows=target_rows,
            target_ids=full.target_ids,
        )

    return compute


def streamed_member_gradients(config: Config) -> GradientsFor:
    """``member_gradients`` computed block by block as they are read (``ComputedGradients``),
    for the streamed train x test attributions of an ensemble: memory one block of
    ``gradients.shard_size`` rows per model instead of n x d."""

    def compute(ctx: ScoringContext, checkpoints: Literal["final", "all"]) -> ComputedGradients:
        chosen = ctx.checkpoints if checkpoints == "all" else [ctx.final]
        return ComputedGradients(ctx, chosen, _StoredForm(config, ctx),
                                 config.gradients.shard_size)

    return compute


class ComputedGradients:
    """A ``GradientSource`` of an extra model whose train gradients are computed when read:
    ``train_shards(c)`` yields (ids (m,), (m, k) float32) blocks of ``shard_size`` train rows,
    each computed then (``per_sample_gradients`` of the model at checkpoint c, in 256-row
    chunks, then ``form``: projected and rounded like the gradients stage); the target rows and
    the target gradient of a checkpoint are computed on first use and kept (T x k). Every pass
    over the train rows recomputes them: compute traded for memory, one block whatever n."""

    def __init__(self, ctx: ScoringContext, checkpoints: list[Checkpoint], form: _StoredForm,
                 shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.ctx = ctx
        self.shard_size = shard_size
        self._checkpoints = {c.index: c for c in checkpoints}
        self._form = form
        self._targets: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def train_shards(self, checkpoint: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        ctx = self.ctx
        model = ctx.model_at(self._checkpoint(checkpoint))
        x, y = to_device(ctx.train_x, ctx.device), ctx.train_y.to(ctx.device)
        ids = np.asarray(ctx.train_ids, dtype=np.int64)
        for start in range(0, len(ids), self.shard_size):
            rows = slice(start, start + self.shard_size)
            yield ids[rows], self._form.rows(per_sample_gradients(model, take(x, rows), y[rows],
                                                                  chunk_size=256))

    def target(self, checkpoint: int) -> torch.Tensor:
        return self._target(checkpoint)[0]

    def target_rows(self, checkpoint: int) -> tuple[np.ndarray, torch.Tensor]:
        rows = self._target(checkpoint)[1]
        if rows is None:
            raise ValueError("the target is not a sum over rows; it has no per-row gradients")
        ids = self.ctx.target_ids
        return (np.arange(rows.shape[0]) if ids is None else np.asarray(ids, np.int64)), rows

    def _checkpoint(self, checkpoint: int) -> Checkpoint:
        if checkpoint not in self._checkpoints:
            raise KeyError(f"no gradients for checkpoint {checkpoint}; held: "
                           f"{sorted(self._checkpoints)}")
        return self._checkpoints[checkpoint]

    def _target(self, checkpoint: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if checkpoint not in self._targets:
            ctx, cost = self.ctx, self.ctx.target
            model = ctx.model_at(self._checkpoint(checkpoint))
            x, y = to_device(ctx.target_x, ctx.device), ctx.target_y.to(ctx.device)
            rows = None
            if cost.decomposable:
                rows = self._form.rows(per_sample_gradients(model, x, y, chunk_size=256,
                                                            cost=cost.cost))
            total = self._form.target(cost.gradient(model, x, y, chunk_size=256))
            self._targets[checkpoint] = (total.to(torch.float64), rows)
        return self._targets[checkpoint]


class _StoredForm:
    """The gradients stage's form of gradient rows: projected with its projector (same seed and
    kind as model 0's), rounded to ``gradients.dtype``, float32; targets projected in float64."""

    def __init__(self, config: Config, ctx: ScoringContext) -> None:
        spec = config.gradients.projection_spec
        self.stored = STORED_DTYPES[config.gradients.dtype]
        self.projector = (make_projector(ctx.model_factory(), spec, config.seed)
                          if spec is not None else None)

    def rows(self, g: torch.Tensor) -> torch.Tensor:
        if self.projector is not None:
            g = self.projector.project(g)
        return g.to(self.stored).to(torch.float32)

    def target(self, g: torch.Tensor) -> torch.Tensor:
        if self.projector is None:
            return g
        return self.projector.project(g.unsqueeze(0), dtype=torch.float64).squeeze(0)
