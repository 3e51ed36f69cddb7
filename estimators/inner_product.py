"""Gradient inner products at the final checkpoint (IP / grad-dot and its cosine variant).

Source: Yang et al., arXiv 2405.17490 (spec section 2). IP is the influence function with the
inverse curvature replaced by the identity, i.e. TracIn with one checkpoint and lr 1.
"""

from __future__ import annotations

import numpy as np
import torch

from estimators._streaming import (
    gradient_source,
    linear_pairwise,
    stream,
    target_dots,
    target_vectors,
)
from estimators.base import Attribution, Estimator, Needs, PairwiseVectors, ScoringContext


class InnerProduct(Estimator):
    """``score(z) = g_z . g_V`` and ``suspicion(z) = ||g_z||^2`` at theta_final.

    g_z (d,) is the gradient of l(z) and g_V (d,) the summed target-loss gradient, so the score
    has units of loss^2 / param^2 and is positive when a gradient step on z lowers the target
    loss (beneficial). Outputs (n,), float64, in the gradient source's shard order.
    """

    name = "ip"
    needs = Needs(checkpoints="final", gradients=True, model=False)

    def score(self, ctx: ScoringContext) -> Attribution:
        source = gradient_source(ctx, self.needs)
        ids, (scores, self_ip) = target_dots(source, ctx.final.index)
        return Attribution(sample_ids=ids, score=scores, suspicion=self_ip)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return linear_pairwise(self, ctx)

    def pairwise_vectors(self, ctx: ScoringContext) -> PairwiseVectors:
        """``{final: G_t}``: the target rows' gradients at theta_final."""
        index = ctx.final.index
        target_ids, rows = target_vectors(gradient_source(ctx, self.needs), index)
        return PairwiseVectors(target_ids, {index: rows})


class CosineInnerProduct(Estimator):
    """``score(z) = g_z . g_V / (||g_z|| ||g_V|| + 1e-12)`` at theta_final, in [-1, 1].

    Removes the dominance of large-gradient (often mislabeled) samples when ranking helpful data.
    Positive = beneficial. No suspicion (a cosine carries no self-influence). Outputs (n,).
    """

    name = "cosine"
    needs = Needs(checkpoints="final", gradients=True, model=False)

    eps: float = 1e-12

    def score(self, ctx: ScoringContext) -> Attribution:
        source = gradient_source(ctx, self.needs)
        index = ctx.final.index
        g_v = source.target(index).to(torch.float64)
        norm_v = torch.linalg.vector_norm(g_v)

        def cosine(g: torch.Tensor) -> tuple[torch.Tensor]:
            return ((g @ g_v) / (torch.linalg.vector_norm(g, dim=1) * norm_v + self.eps),)

        ids, (scores,) = stream(source, index, cosine)
        return Attribution(sample_ids=ids, score=scores, suspicion=None)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return linear_pairwise(self, ctx)

    def pairwise_vectors(self, ctx: ScoringContext) -> PairwiseVectors:
        """``{final: G_t / ||G_t||}`` with the train rows normalized too: each entry a cosine
        (every target row normalized on its own)."""
        index = ctx.final.index
        target_ids, rows = target_vectors(gradient_source(ctx, self.needs), index, normalize=True)
        return PairwiseVectors(target_ids, {index: rows}, normalize=True, eps=self.eps)
