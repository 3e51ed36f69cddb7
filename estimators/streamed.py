"""Train x target scores streamed block by block, whatever the estimator's form.

``pairwise_stream(estimator, ctx)``: the estimator's ``PairwiseStream`` — its
``pairwise_vectors`` scored against the train gradients block by block (``linear_stream``),
or its own ``pairwise_stream``. ``mean_stream``: the mean of
several streams block by block (a model ensemble). ``gathered``: a stream as the whole
(train ids (n,), target ids (T,), (n, T) float64) matrix, for library use. Project sign
throughout: > 0 means training sample z is beneficial to target t.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch

from estimators._streaming import gradient_source
from estimators.base import (
    Estimator,
    GradientSource,
    PairwiseStream,
    PairwiseVectors,
    ScoringContext,
)
from estimators.blockwise import pairwise_blocks

Block = tuple[np.ndarray, torch.Tensor]


def pairwise_stream(estimator: Estimator, ctx: ScoringContext) -> PairwiseStream:
    """``estimator``'s train x target scores as a stream of training blocks. A linear estimator
    (``pairwise_vectors``) reads ``ctx.gradients`` (or gradients it computes in memory); its
    vectors are computed now, the blocks when asked for. Raises NotImplementedError when the
    estimator streams neither way (``Estimator.streams_pairwise``)."""
    if type(estimator).pairwise_vectors is Estimator.pairwise_vectors:
        return estimator.pairwise_stream(ctx)
    source = gradient_source(ctx, estimator.needs)
    return linear_stream(source, estimator.pairwise_vectors(replace(ctx, gradients=source)))


def linear_stream(source: GradientSource, vectors: PairwiseVectors) -> PairwiseStream:
    """The stream of ``vectors`` scored against ``source``'s train gradients, block by block
    (``blockwise.pairwise_blocks``), each block computed when asked for."""
    return PairwiseStream(np.asarray(vectors.target_ids, dtype=np.int64),
                          pairwise_blocks(source, vectors))


def mean_stream(streams: Sequence[PairwiseStream]) -> PairwiseStream:
    """The mean over ``streams`` (all with the same target ids, ValueError otherwise) of their
    scores, block by block: the blocks are read in step and cut to common row ranges (block
    sizes may differ; the train ids must come in the same order, ValueError otherwise), each
    ``(sum_k scores_k) / K`` summed in stream order (the numbers of averaging whole matrices).
    Memory: one block and its (m, T) scores per stream, whatever n."""
    if not streams:
        raise ValueError("no streams to average")
    target_ids = np.asarray(streams[0].target_ids, dtype=np.int64)
    if any(not np.array_equal(s.target_ids, target_ids) for s in streams[1:]):
        raise ValueError("ensemble members have different target rows")
    return PairwiseStream(target_ids, _mean_blocks([s.blocks for s in streams]))


def _mean_blocks(streams: list[Iterator[Block]]) -> Iterator[Block]:
    held: list[Block | None] = [None] * len(streams)
    while True:
        held = [h if h is not None and len(h[0]) else next(s, None)
                for h, s in zip(held, streams, strict=True)]
        if all(h is None for h in held):
            return
        if any(h is None for h in held):
            raise ValueError("ensemble members hold different numbers of train rows")
        m = min(len(h[0]) for h in held)
        ids = held[0][0][:m]
        if any(not np.array_equal(h[0][:m], ids) for h in held[1:]):
            raise ValueError("ensemble members yield train rows in different orders")
        total = held[0][1][:m].clone()
        for h in held[1:]:
            total += h[1][:m]
        yield ids, total / len(held)
        held = [(h[0][m:], h[1][m:]) for h in held]


def gathered(stream: PairwiseStream) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole stream: (train ids (n,), target ids (T,), scores (n, T) float64); memory
    n x T (the score stage writes the blocks instead). ValueError when it yields no block."""
    ids: list[np.ndarray] = []
    parts: list[np.ndarray] = []
    for block_ids, scores in stream.blocks:
        ids.append(np.array(block_ids, dtype=np.int64))
        parts.append(scores.detach().cpu().numpy().astype(np.float64, copy=True))
    if not ids:
        raise ValueError("the stream yielded no train blocks")
    return np.concatenate(ids), np.asarray(stream.target_ids, dtype=np.int64), np.concatenate(parts)
