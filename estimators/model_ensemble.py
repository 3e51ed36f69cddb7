"""Any estimator averaged over independently trained models (an ensemble over training seeds).

With K models theta^(0..K-1) trained by the same recipe from different seeds (``train.models``;
``ctx.checkpoints`` is model 0, ``ctx.extra_models`` models 1..K-1), the ensemble score is the
plain mean of the base estimator's scores on each model::

    score(i)     = (1/K) sum_m score_m(i)          (n,)  project sign kept: positive = beneficial
    suspicion(i) = (1/K) sum_m suspicion_m(i)      (n,)  None when the base estimator gives none
    tau(i, t)    = (1/K) sum_m tau_m(i, t)         (n, n_targets) train x target scores

A retrain's outcome is random over the training seed; each ``score_m`` predicts the change for
one seed, their mean predicts the expected change, which is what the retrain ground truth (mean
over retrain seeds) measures. TRAK averages over models inside its own formula
(``estimators/trak.py``) and is not wrapped; neither is an estimator that reads no model.

Member m sees ``ctx`` with its own checkpoints and no extra models. Model 0 keeps
``ctx.gradients`` (the pipeline's stored gradients); for m >= 1 an estimator that reads
per-sample gradients gets ``gradients_for(member_ctx, needs.checkpoints)`` or, without it,
computes them itself in memory (``estimators._streaming.gradient_source``). Members run one after
the other, so the extra memory is one member's gradients at a time: n x d floats per checkpoint
the estimator reads (final, or all), plus its target rows. ``pairwise_stream`` (a base that
streams) reads all members in step instead, block by block, with no (n, n_targets) matrix.

A ``MemberRunner`` lets other processes compute some members' ``score`` or
``pairwise_vectors`` while this one computes the rest (``tasks.member_pool``: one worker
process per idle core); every member is computed exactly once, by the same code, so the
outputs do not depend on where a member ran.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from functools import partial
from typing import Any, Literal, Protocol, TypeVar

import numpy as np

from estimators._streaming import gradient_source
from estimators.base import (
    Attribution,
    Estimator,
    GradientSource,
    PairwiseStream,
    PairwiseVectors,
    ScoringContext,
)
from estimators.streamed import linear_stream, mean_stream, pairwise_stream

T = TypeVar("T")
GradientsFor = Callable[[ScoringContext, Literal["final", "all"]], GradientSource]
"""Per-sample gradients of one member's context at its final or all checkpoints."""
MemberMethod = Literal["score", "pairwise_vectors"]
"""What one member computes: its ``score`` (an Attribution) or its ``pairwise_vectors``."""


class MemberRunner(Protocol):
    """Computes members of an ensemble elsewhere while the caller computes others."""

    def map(self, method: MemberMethod, count: int, here: Callable[[int], Any]) -> list[Any]:
        """Member m's ``method`` result for m in range(count), in member order: each from
        ``here(m)`` (this process) or from ``ModelEnsemble.member_result(ctx, method, m)`` run
        on an equal ensemble and context elsewhere; every member computed once."""


def averages_over_models(estimator: Estimator) -> bool:
    """True when ``estimator`` reads a trained model (its parameters or per-sample gradients)
    and does not itself combine ``ctx.extra_models`` (TRAK does)."""
    needs = estimator.needs
    return (needs.model or needs.gradients) and not needs.models


class ModelEnsemble(Estimator):
    """``base`` run on every trained model of the context, outputs averaged (module docstring).

    ``gradients_for``: how a member m >= 1 gets its per-sample gradients (default: the base
    estimator computes them in memory); ``stream_gradients_for``: the same for
    ``pairwise_stream`` (default ``gradients_for``; e.g. gradients computed block by block as
    they are read); ``on_member(m, K)`` is called before member m runs here; ``runner``: where
    ``score`` and a linear base's ``pairwise_stream`` may compute members besides here (None:
    all here, one after the other). With no extra models the output is the base estimator's,
    bit for bit.
    """

    def __init__(
        self,
        base: Estimator,
        gradients_for: GradientsFor | None = None,
        on_member: Callable[[int, int], None] | None = None,
        stream_gradients_for: GradientsFor | None = None,
        runner: MemberRunner | None = None,
    ) -> None:
        if not averages_over_models(base):
            raise ValueError(f"{base.name} reads no model or combines models itself")
        self.base = base
        self.name = base.name
        self.needs = replace(base.needs, models=True)
        self.gradients_for = gradients_for
        self.on_member = on_member
        self.stream_gradients_for = stream_gradients_for or gradients_for
        self.runner = runner

    def members(
        self, ctx: ScoringContext, gradients_for: GradientsFor | None = None
    ) -> Iterator[ScoringContext]:
        """The context of each model in turn (``member``), ``on_member`` called before each."""
        count = 1 + len(ctx.extra_models)
        for m in range(count):
            if self.on_member is not None:
                self.on_member(m, count)
            yield self.member(ctx, m, gradients_for)

    def member(
        self, ctx: ScoringContext, m: int, gradients_for: GradientsFor | None = None
    ) -> ScoringContext:
        """Model m's context: model 0 as given (its ``ctx.gradients``), model m >= 1 with its
        own checkpoints and gradients from ``gradients_for`` (default ``self.gradients_for``;
        None: the base estimator computes them)."""
        checkpoints = [ctx.checkpoints, *ctx.extra_models][m]
        if not checkpoints:
            raise ValueError(f"model {m} of the ensemble has no checkpoints")
        if m == 0:
            return replace(ctx, extra_models=[])
        member = replace(ctx, checkpoints=checkpoints, extra_models=[], gradients=None)
        gradients_for = gradients_for or self.gradients_for
        if self.base.needs.gradients and gradients_for is not None:
            member.gradients = gradients_for(member, self.base.needs.checkpoints)
        return member

    def member_result(
        self, ctx: ScoringContext, method: MemberMethod, m: int
    ) -> Attribution | PairwiseVectors:
        """Model m's ``score`` or ``pairwise_vectors`` (its gradients from
        ``stream_gradients_for``), as ``score`` and ``pairwise_stream`` compute it: what a
        ``MemberRunner`` runs elsewhere."""
        if method == "score":
            return self._guarded(m, self.base.score, self.member(ctx, m))
        return self._guarded(m, self.base.pairwise_vectors, self._streamed_member(ctx, m))

    def _streamed_member(self, ctx: ScoringContext, m: int) -> ScoringContext:
        """Model m's context with its gradient source for the streamed train x test scores
        (``stream_gradients_for``, else computed in memory)."""
        member = self.member(ctx, m, self.stream_gradients_for)
        return replace(member, gradients=gradient_source(member, self.base.needs))

    def score(self, ctx: ScoringContext) -> Attribution:
        runs = self._map(ctx, "score", lambda m: self.member_result(ctx, "score", m))
        ids = runs[0].sample_ids
        for run in runs[1:]:
            _same_ids(ids, run.sample_ids, "train")
        suspicion = None
        if all(run.suspicion is not None for run in runs):
            suspicion = _mean([run.suspicion for run in runs])
        return Attribution(ids, _mean([run.score for run in runs]), suspicion)

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean over models of the base estimator's train x target scores: (train ids (n,),
        target ids (m,), (n, m) float64), gathered whole: memory two (n, m) matrices, the
        running sum and one model's (the score stage streams a base that streams:
        ``pairwise_stream``)."""
        total, count = None, 0
        for train_ids, target_ids, matrix in self._each(ctx, self.base.pairwise):
            if total is None:
                first, total = (train_ids, target_ids), np.array(matrix, dtype=np.float64)
            else:
                _same_ids(first[0], train_ids, "train")
                _same_ids(first[1], target_ids, "target")
                total += matrix
            count += 1
        return first[0], first[1], total / count

    def streams_pairwise(self) -> bool:
        """Whether the base estimator streams its train x target scores (then so does the
        ensemble: ``pairwise_stream``)."""
        return self.base.streams_pairwise()

    def pairwise_stream(self, ctx: ScoringContext) -> PairwiseStream:
        """The mean over models of the base estimator's ``streamed.pairwise_stream``, block by
        block (``streamed.mean_stream``): ``pairwise``'s numbers without an (n, m) matrix.
        Every member's stream is prepared first (its target vectors or factors, m x d floats
        per member; a linear base's vectors through ``runner``), then all are read in step,
        one block of each at a time. Model 0 reads ``ctx.gradients`` block by block; an extra
        model's gradients come from ``stream_gradients_for`` and stay alive until the stream
        ends: K - 1 sources at once (n x d floats each when held in memory, one block when
        computed as read)."""
        if not self.streams_pairwise():
            raise NotImplementedError(f"{self.name} has no streamed train x test form")
        if type(self.base).pairwise_vectors is Estimator.pairwise_vectors:
            run = partial(pairwise_stream, self.base)
            return mean_stream(list(self._each(ctx, run, self.stream_gradients_for)))
        members = [self._streamed_member(ctx, m) for m in range(1 + len(ctx.extra_models))]
        vectors = self._map(ctx, "pairwise_vectors", lambda m: self._guarded(
            m, self.base.pairwise_vectors, members[m]))
        return mean_stream([linear_stream(member.gradients, v)
                            for member, v in zip(members, vectors, strict=True)])

    def _map(self, ctx: ScoringContext, method: MemberMethod,
             here: Callable[[int], T]) -> list[T]:
        """``here(m)`` for every member in order (``on_member`` first), or, with a
        ``runner``, each member either here or elsewhere."""
        count = 1 + len(ctx.extra_models)

        def announced(m: int) -> T:
            if self.on_member is not None:
                self.on_member(m, count)
            return here(m)

        if self.runner is None or count == 1:
            return [announced(m) for m in range(count)]
        return self.runner.map(method, count, announced)

    def _each(
        self, ctx: ScoringContext, run: Callable[[ScoringContext], T],
        gradients_for: GradientsFor | None = None,
    ) -> Iterator[T]:
        """``run`` on every member in turn, one after the other."""
        for m, member in enumerate(self.members(ctx, gradients_for)):
            yield self._guarded(m, run, member)

    def _guarded(self, m: int, run: Callable[[ScoringContext], T], member: ScoringContext) -> T:
        """``run(member)``; a ValueError names the model it came from."""
        try:
            return run(member)
        except ValueError as exc:
            raise ValueError(f"{self.name} on model {m} of the ensemble: {exc}") from exc


def _mean(arrays: list[np.ndarray]) -> np.ndarray:
    """Sum in model order, then divide by K (K = 1 returns the values unchanged)."""
    total = np.asarray(arrays[0], dtype=np.float64).copy()
    for array in arrays[1:]:
        total += array
    return total / len(arrays)


def _same_ids(first: np.ndarray, other: np.ndarray, what: str) -> None:
    if not np.array_equal(first, other):
        raise ValueError(f"ensemble members returned {what} rows in different orders")
