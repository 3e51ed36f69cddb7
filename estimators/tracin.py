"""TracInCP: learning-rate-weighted gradient inner products summed over checkpoints.

Source: Pruthi et al., arXiv 2002.08484 (spec section 3). The derivation assumes plain SGD; with
momentum or Adam it is a heuristic.
"""

from __future__ import annotations

import numpy as np

from estimators._streaming import (
    align,
    gradient_source,
    linear_pairwise,
    target_dots,
    target_vectors,
)
from estimators.base import Attribution, Estimator, Needs, PairwiseVectors, ScoringContext


class TracIn(Estimator):
    """``score(z) = sum_c lr_c * g_z(c) . g_V(c)``, ``suspicion(z) = sum_c lr_c * ||g_z(c)||^2``.

    c runs over every checkpoint in ``ctx.checkpoints`` (lr_c = ``Checkpoint.lr``); g_z(c) (d,) is
    the gradient of l(z) at theta_c and g_V(c) (d,) the summed target-loss gradient there. The
    score approximates the target-loss decrease contributed by z's SGD steps (positive =
    beneficial). Outputs (n,), float64, ordered like the first checkpoint's shards.
    """

    name = "tracin"
    needs = Needs(checkpoints="all", gradients=True, model=False)

    def score(self, ctx: ScoringContext) -> Attribution:
        if not ctx.checkpoints:
            raise ValueError("TracIn needs at least one checkpoint")
        source = gradient_source(ctx, self.needs)
        first, *rest = ctx.checkpoints
        ids, (dot, self_ip) = target_dots(source, first.index)
        score, suspicion = first.lr * dot, first.lr * self_ip
        for ckpt in rest:
            c_ids, (dot, self_ip) = target_dots(source, ckpt.index)
            score += ckpt.lr * align(ids, c_ids, dot)
            suspicion += ckpt.lr * align(ids, c_ids, self_ip)
        return Attribution(sample_ids=ids, score=score, suspicion=suspicion)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``sum_c lr_c G_train(c) G_t(c)^T``: (train ids, target ids, (n, m))."""
        return linear_pairwise(self, ctx)

    def pairwise_vectors(self, ctx: ScoringContext) -> PairwiseVectors:
        """``{c: lr_c G_t(c)}`` for every checkpoint c (the train rows of all checkpoints are
        streamed in step, so they must come in the same order at each)."""
        if not ctx.checkpoints:
            raise ValueError("TracIn needs at least one checkpoint")
        source = gradient_source(ctx, self.needs)
        target_ids, vectors = None, {}
        for ckpt in ctx.checkpoints:
            ids, rows = target_vectors(source, ckpt.index)
            if target_ids is not None and not np.array_equal(ids, target_ids):
                raise ValueError("checkpoints disagree on the target rows")
            target_ids, vectors[ckpt.index] = ids, ckpt.lr * rows
        return PairwiseVectors(target_ids, vectors)
