"""Small helpers shared by the gradient-based estimators (not public API)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from estimators.base import Estimator, GradientSource, Needs, ScoringContext
from estimators.blockwise import pairwise_matrix
from estimators.gradient_source import InMemoryGradients

ShardFn = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


def gradient_source(ctx: ScoringContext, needs: Needs) -> GradientSource:
    """``ctx.gradients``, or (library use without a pipeline) gradients computed in memory."""
    if ctx.gradients is not None:
        return ctx.gradients
    return InMemoryGradients.from_context(ctx, checkpoints=needs.checkpoints)


def stream(
    source: GradientSource, checkpoint: int, fn: ShardFn
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Apply ``fn`` to every train shard (rows cast to float64) and concatenate its outputs.

    ``fn`` maps gradients (m, d) to a tuple of per-row tensors (m,). Returns the sample ids (n,)
    in shard order and one float64 array (n,) per output of ``fn``.
    """
    ids: list[np.ndarray] = []
    outputs: list[list[np.ndarray]] = []
    for shard_ids, grads in source.train_shards(checkpoint):
        values = fn(grads.to(torch.float64))
        ids.append(np.asarray(shard_ids, dtype=np.int64))
        outputs.append([v.detach().cpu().numpy().astype(np.float64) for v in values])
    if not ids:
        raise ValueError(f"the gradient source yielded no train shards for checkpoint {checkpoint}")
    columns = [np.concatenate(col) for col in zip(*outputs, strict=True)]
    return np.concatenate(ids), columns


def align(reference: np.ndarray, ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Reorder ``values`` (keyed by ``ids``) to follow ``reference`` ids; both hold the same ids."""
    if np.array_equal(reference, ids):
        return values
    order = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, reference, sorter=order)
    pos = np.clip(pos, 0, len(ids) - 1)
    if len(ids) != len(reference) or not np.array_equal(ids[order[pos]], reference):
        raise ValueError("checkpoints disagree on the set of train sample ids")
    return values[order[pos]]


def target_dots(source: GradientSource, checkpoint: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sample ids (n,) and [g_z . g_V, ||g_z||^2] (each (n,), float64) at ``checkpoint``."""
    g_v = source.target(checkpoint).to(torch.float64)
    return stream(source, checkpoint, lambda g: (g @ g_v, (g * g).sum(dim=1)))


def target_vectors(
    source: GradientSource,
    checkpoint: int,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalize: bool = False,
) -> tuple[np.ndarray, torch.Tensor]:
    """Target ids (T,) int64 and the target rows at ``checkpoint`` as (T, k) float64 vectors:
    ``transform(rows)`` when given (e.g. an inverse-curvature solve, (T, k) to (T, k)), divided
    by their norms + 1e-12 when ``normalize`` (cosine)."""
    target_ids, rows = source.target_rows(checkpoint)
    rows = rows.to(torch.float64)
    if transform is not None:
        rows = transform(rows)
    if normalize:
        rows = rows / (torch.linalg.vector_norm(rows, dim=1, keepdim=True) + 1e-12)
    return np.asarray(target_ids, dtype=np.int64), rows


def linear_pairwise(
    estimator: Estimator, ctx: ScoringContext
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``pairwise`` of an estimator with ``pairwise_vectors``: its vectors scored against every
    train block and gathered, (train ids (n,), target ids (T,), (n, T) float64)."""
    ctx = replace(ctx, gradients=gradient_source(ctx, estimator.needs))
    return pairwise_matrix(ctx.gradients, estimator.pairwise_vectors(ctx))
