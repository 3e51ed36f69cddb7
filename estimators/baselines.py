"""Reference baselines: random scores and the (negated) self-loss."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from estimators.base import Attribution, Estimator, Needs, ScoringContext
from workloads.inputs import call_model, num_rows, take


class RandomScores(Estimator):
    """``score = rng(seed).standard_normal(n)``; no suspicion. Reads only ``ctx.train_ids``.

    ``seed`` defaults to ``ctx.seed``. Scores are unitless and carry no information.
    """

    name = "random"
    needs = Needs(checkpoints="final", gradients=False, model=False)

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def score(self, ctx: ScoringContext) -> Attribution:
        seed = ctx.seed if self.seed is None else self.seed
        ids = np.asarray(ctx.train_ids, dtype=np.int64)
        scores = np.random.default_rng(seed).standard_normal(len(ids))
        return Attribution(sample_ids=ids, score=scores)


class SelfLoss(Estimator):
    """``score(z) = -l(z; theta_final)`` and ``suspicion(z) = l(z; theta_final)``.

    l is the per-sample cross-entropy in nats at the final checkpoint (eval mode). High-loss
    samples count as detrimental. Output shapes (n,), float64, aligned with ``ctx.train_ids``.
    """

    name = "loss"
    needs = Needs(checkpoints="final", gradients=False, model=True)

    def __init__(self, batch_size: int = 1024) -> None:
        self.batch_size = batch_size

    def score(self, ctx: ScoringContext) -> Attribution:
        model = ctx.model_at(ctx.final)
        losses = []
        with torch.no_grad():
            for start in range(0, num_rows(ctx.train_x), self.batch_size):
                stop = start + self.batch_size
                logits = call_model(model, take(ctx.train_x, slice(start, stop)))
                losses.append(F.cross_entropy(logits, ctx.train_y[start:stop], reduction="none"))
        loss = torch.cat(losses).to(torch.float64).cpu().numpy()
        ids = np.asarray(ctx.train_ids, dtype=np.int64)
        return Attribution(sample_ids=ids, score=-loss, suspicion=loss)
