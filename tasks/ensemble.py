"""The estimator the score stage runs: the configured one, averaged over ``train.models``.

With ``train.models = K > 1`` every estimator that reads a trained model is wrapped in
``estimators.model_ensemble.ModelEnsemble`` (mean of its scores over the K models); ``random``
reads none and ``trak`` combines the models itself, so both run as configured. With K = 1 the
configured estimator runs unwrapped (bit-identical to a run without this module).

The gradients stage stores per-sample gradients of model 0 only. Models 1..K-1 get theirs in
memory, one model at a time, in the form that stage stores them (``member_gradients``).
"""

from __future__ import annotations

from typing import Literal

import torch
from prefect import get_run_logger

from estimators.base import Estimator, ScoringContext
from estimators.gradient_source import InMemoryGradients
from estimators.model_ensemble import GradientsFor, ModelEnsemble, averages_over_models
from estimators.projection import Projector
from estimators.registry import make_estimator
from storage.gradient_shards import STORED_DTYPES
from tasks.config import Config


def scored_estimator(config: Config, name: str) -> Estimator:
    """The configured estimator ``name``; averaged over the models when ``train.models > 1``."""
    estimator = make_estimator(name, **config.estimator(name).options)
    if config.train.models == 1 or not averages_over_models(estimator):
        return estimator

    def announce(member: int, count: int) -> None:
        get_run_logger().info("score: %s on model %d (%d of %d)", name, member, member + 1,
                              count)

    return ModelEnsemble(estimator, member_gradients(config), announce)


def member_gradients(config: Config) -> GradientsFor:
    """Per-sample gradients of an extra model's context, as the gradients stage would store them:
    train rows, target rows (when the target is a sum over rows) and the target gradient, at the
    final or every checkpoint, projected with the stage's projector (``gradients.projection``,
    same seed and kind, so the same P as model 0) and rounded to ``gradients.dtype``; rows are
    float32 (what stored shards read back as), the target float64.

    Memory, for one model at a time (released once it is scored): n x d floats per checkpoint
    read (the final, or all), plus n x k float32 per checkpoint while projecting.
    """
    k, kind = config.gradients.projection, config.gradients.projection_kind
    stored = STORED_DTYPES[config.gradients.dtype]

    def compute(ctx: ScoringContext, checkpoints: Literal["final", "all"]) -> InMemoryGradients:
        full = InMemoryGradients.from_context(ctx, checkpoints=checkpoints,
                                              shard_size=config.gradients.shard_size)
        projector = (Projector.for_model(ctx.model_factory(), k, seed=config.seed, kind=kind)
                     if k else None)

        def rows(g: torch.Tensor) -> torch.Tensor:
            if projector is not None:
                g = projector.project(g)
            return g.to(stored).to(torch.float32)

        def target(g: torch.Tensor) -> torch.Tensor:
            if projector is None:
                return g
            return projector.project(g.unsqueeze(0), dtype=torch.float64).squeeze(0)

        indices = full.checkpoints
        target_rows = None
        if full.has_target_rows:
            target_rows = {c: rows(full.target_rows(c)[1]) for c in indices}
        return InMemoryGradients(
            full.train_ids,
            {c: rows(full.train_matrix(c)) for c in indices},
            {c: target(full.target(c)) for c in indices},
            shard_size=config.gradients.shard_size,
            target_rows=target_rows,
            target_ids=full.target_ids,
        )

    return compute
