"""Train x target inner products, streamed block by block: memory is bounded by one block of
training gradients and its (m, T) scores, never by the number of training samples.

Sign: entries are ``g_z . g_t`` (IP / TracIn with one checkpoint and unit learning rate); > 0
means training sample z is beneficial to target t (the project's convention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

BlockSink = Callable[[np.ndarray, torch.Tensor], None]


@dataclass
class StreamSummary:
    """Per training sample, over all T targets: the summed score (the score against the summed
    target), the most negative score and which target it is for (the sample's worst harm)."""

    sample_ids: np.ndarray
    summed: np.ndarray
    worst: np.ndarray
    worst_target: np.ndarray


def stream_scores(
    blocks: Iterable[tuple[np.ndarray, torch.Tensor]],
    targets: torch.Tensor,
    sink: BlockSink | None = None,
) -> StreamSummary:
    """Score every training block against ``targets`` (T, k).

    ``blocks`` yields (ids (m,), gradients (m, k)) in the targets' dtype and on their device
    (views are fine: each is read before the next one is asked for). ``sink(ids, scores)``
    receives each (m, T) block of the train x target matrix (e.g. to write attributions part
    by part) before the next block; ``scores`` lives in a buffer reused for the next block
    (copy what you keep). The summed score is ``g . (sum_t g_t)`` (one matrix-vector product
    in the targets' dtype, then float64).
    """
    total = targets.sum(dim=0)
    buffer = targets.new_empty(0, targets.shape[0])
    ids, summed, worst, which = [], [], [], []
    for block_ids, grads in blocks:
        m = grads.shape[0]
        if buffer.shape[0] < m:  # one allocation, reused: no fresh pages per block
            buffer = targets.new_empty(m, targets.shape[0])
        scores = torch.matmul(grads, targets.T, out=buffer[:m])
        if sink is not None:
            sink(block_ids, scores)
        low, arg = scores.min(dim=1)
        ids.append(np.asarray(block_ids, dtype=np.int64))
        summed.append(torch.mv(grads, total).to(torch.float64).cpu().numpy())
        worst.append(low.cpu().numpy())
        which.append(arg.cpu().numpy())
    if not ids:
        raise ValueError("no training blocks to score")
    return StreamSummary(np.concatenate(ids), np.concatenate(summed), np.concatenate(worst),
                         np.concatenate(which))
