"""Train x target scores, streamed block by block: memory is bounded by one block of training
gradients and its (m, T) scores, never by the number of training samples.

``stream_scores``: raw inner products ``g_z . g_t`` (IP / TracIn with one checkpoint and unit
learning rate). ``stream_pairwise``: any estimator's ``PairwiseVectors`` (the score stage's
train x test attributions); ``pairwise_blocks``: the same blocks as an iterator (for
``estimators.streamed``). Sign: > 0 means training sample z is beneficial to target t (the
project's convention).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from estimators.base import GradientSource, PairwiseVectors

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


def stream_pairwise(source: GradientSource, vectors: PairwiseVectors, sink: BlockSink) -> None:
    """Score the train gradients of ``source`` against ``vectors``, block by block.

    Reads ``source.train_blocks(c)`` when the source has it (stored shards streamed in
    row-group blocks, checksums verified as they go), else ``source.train_shards(c)``, for
    every checkpoint c of ``vectors`` in step: the same rows must come in the same blocks at
    every checkpoint (ValueError otherwise). ``sink(ids (m,), scores (m, T) float64)`` gets each
    block's ``sum_c u(c) @ vectors[c].T`` (``PairwiseVectors``) before the next block is read.
    Memory: one block per checkpoint, its (m, T) scores and the vectors, whatever n. A damaged
    shard raises BadInput after its last block reached ``sink``: commit only on return.
    """
    blocks = 0
    for ids, scores in pairwise_blocks(source, vectors):
        sink(ids, scores)
        blocks += 1
    if not blocks:
        raise ValueError("the gradient source yielded no train blocks")


def pairwise_blocks(
    source: GradientSource, vectors: PairwiseVectors
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``stream_pairwise``'s blocks as an iterator: (ids (m,) int64, scores (m, T) float64, a
    fresh tensor per block), each computed when asked for."""
    checkpoints = sorted(vectors.vectors)
    targets = [vectors.vectors[c].to(torch.float64) for c in checkpoints]
    read = getattr(source, "train_blocks", source.train_shards)
    for ids, grads in _in_step([iter(read(c)) for c in checkpoints]):
        scores = None
        for g, v in zip(grads, targets, strict=True):
            g = g.to(device=v.device, dtype=torch.float64)
            if vectors.normalize:
                g = g / (torch.linalg.vector_norm(g, dim=1, keepdim=True) + vectors.eps)
            part = g @ v.T
            scores = part if scores is None else scores.add_(part)
        yield np.asarray(ids, dtype=np.int64), scores


def pairwise_matrix(
    source: GradientSource, vectors: PairwiseVectors
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``stream_pairwise`` gathered: (train ids (n,), target ids (T,), scores (n, T) float64),
    for library use (memory n x T; the score stage writes the blocks instead)."""
    ids: list[np.ndarray] = []
    parts: list[np.ndarray] = []

    def keep(block_ids: np.ndarray, scores: torch.Tensor) -> None:
        ids.append(block_ids.copy())
        parts.append(scores.cpu().numpy())

    stream_pairwise(source, vectors, keep)
    return (np.concatenate(ids), np.asarray(vectors.target_ids, dtype=np.int64),
            np.concatenate(parts))


def _in_step(
    iterators: list[Iterator[tuple[np.ndarray, torch.Tensor]]],
) -> Iterator[tuple[np.ndarray, list[torch.Tensor]]]:
    """Yield (ids, [block of each iterator]) while the iterators yield the same ids; every
    iterator is run to its end (so a streaming reader's final check runs)."""
    first, *rest = iterators
    for ids, grads in first:
        others = [next(it, None) for it in rest]
        if any(o is None or not np.array_equal(o[0], ids) for o in others):
            raise ValueError("checkpoints yield different train rows per block; streaming "
                             "needs the same row order and blocks at every checkpoint")
        yield ids, [grads, *(o[1] for o in others)]
    if any(next(it, None) is not None for it in rest):
        raise ValueError("checkpoints hold different numbers of train rows")
