"""The one interface every estimator implements.

Sign convention (project-wide): ``score > 0`` means the training sample is beneficial to the
target (removing it is predicted to raise the target cost); ``score < 0`` means harmful.
``suspicion`` is a separate, sign-free output (higher = more likely mislabeled or an outlier).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch
from torch import nn

from estimators.targets import SummedLoss, Target
from workloads.inputs import Inputs


@dataclass(frozen=True)
class Needs:
    """What an estimator consumes, so the pipeline computes only that.

    checkpoints: "final" (last checkpoint only) or "all" (every captured checkpoint).
    gradients: stored per-sample gradients of the train split and the target split.
    model: direct model access (forward/backward passes over ``ScoringContext`` data, HVPs).
    """

    checkpoints: Literal["final", "all"] = "final"
    gradients: bool = False
    model: bool = False
    full_gradients: bool = False
    """True when stored gradients must be unprojected (the estimator needs parameter space)."""
    models: bool = False
    """True when the estimator uses ``ScoringContext.extra_models`` (ensembles over seeds)."""


@dataclass(frozen=True)
class Checkpoint:
    """One captured model state after global step ``step``. ``lr`` is the mean learning rate over
    the interval it closes (TracIn's eta_c); ``step_lr`` the learning rate of the step itself
    (Diff-In's eta_t), None when unknown (then use ``lr``)."""

    index: int
    step: int
    lr: float
    load: Callable[[], dict[str, torch.Tensor]]
    step_lr: float | None = None


class GradientSource(Protocol):
    """Per-sample gradients, flattened in the model's parameter order (float32 rows)."""

    def train_shards(self, checkpoint: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (sample_ids (m,), gradients (m, k)) shards of the train split, in a fixed order."""
        ...

    def target(self, checkpoint: int) -> torch.Tensor:
        """The summed target gradient g_V, shape (k,), float64."""
        ...

    def target_rows(self, checkpoint: int) -> tuple[np.ndarray, torch.Tensor]:
        """Per-sample target gradients for pairwise scores: (target ids (m,), (m, k))."""
        ...


@dataclass
class ScoringContext:
    """Everything an estimator may read. Tensors are on ``device``. ``train_x``/``target_x``
    are model inputs (``workloads.inputs``): one (n, *shape) tensor, or name -> tensor for a
    model of several input columns; ``model_factory`` builds the model with only the
    attributed parameters trainable (``model.modules``)."""

    model_factory: Callable[[], nn.Module]
    checkpoints: list[Checkpoint]
    train_ids: np.ndarray
    train_x: Inputs
    train_y: torch.Tensor
    target_x: Inputs
    target_y: torch.Tensor
    gradients: GradientSource | None = None
    weight_decay: float = 0.0
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    target_ids: np.ndarray | None = None
    batch_size: int = 32
    target: Target = field(default_factory=SummedLoss)
    """The cost scored against (default: the summed loss of the target rows)."""
    extra_models: list[list[Checkpoint]] = field(default_factory=list)
    """Checkpoints of independently trained models (same recipe, other seeds), for ensembles;
    each list is in training order, its last entry that model's final state."""

    @property
    def final(self) -> Checkpoint:
        return self.checkpoints[-1]

    def model_at(self, checkpoint: Checkpoint) -> nn.Module:
        """A fresh model in eval mode holding ``checkpoint``'s parameters."""
        model = self.model_factory().to(self.device)
        model.load_state_dict(checkpoint.load())
        return model.eval()


@dataclass
class Attribution:
    """Scores for every training sample: ``score`` (n,) float64 in the project sign,
    ``suspicion`` (n,) float64 or None, both aligned with ``sample_ids`` (n,) int64."""

    sample_ids: np.ndarray
    score: np.ndarray
    suspicion: np.ndarray | None = None


@dataclass
class PairwiseVectors:
    """Target vectors of train x target scores that are linear in the stored train gradients:

        ``scores[z, t] = sum_c u_z(c) . vectors[c][t]``

    over the checkpoint indices c in ``vectors`` (each (T, k) float64, rows aligned with
    ``target_ids`` (T,) int64), with u_z(c) (k,) training sample z's stored gradient at c
    (``GradientSource.train_shards``), divided by ``||u_z(c)|| + eps`` when ``normalize``
    (cosine). Project sign: > 0 means z is beneficial to target t. Examples: IP ``vectors =
    {final: G_t}``; TracIn ``{c: lr_c G_t(c)}``; influence functions ``{final: G_t H^{-1}}``.
    Memory is T x k per checkpoint, whatever n; ``estimators.blockwise.stream_pairwise`` scores
    the train gradients against them block by block.
    """

    target_ids: np.ndarray
    vectors: dict[int, torch.Tensor]
    normalize: bool = False
    eps: float = 1e-12


@dataclass
class PairwiseStream:
    """Train x target scores as blocks of training rows, each computed when asked for:
    ``blocks`` yields (train ids (m,) int64, scores (m, T) float64) in a fixed order, every
    train row once, columns aligned with ``target_ids`` (T,) int64; project sign (> 0: z is
    beneficial to target t). A block is read before the next is asked for (copy what you keep).
    Memory: one block at a time plus what the estimator prepared (target vectors, curvature
    factors), whatever n. ``estimators.streamed`` writes, gathers and averages them."""

    target_ids: np.ndarray
    blocks: Iterator[tuple[np.ndarray, torch.Tensor]]


class Estimator(ABC):
    """A training-data attribution method. Subclasses set ``name`` and ``needs``."""

    name: str
    needs: Needs

    @abstractmethod
    def score(self, ctx: ScoringContext) -> Attribution:
        """Score every training sample against the summed target loss."""

    def pairwise(self, ctx: ScoringContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Train x target scores for single target samples: (train ids (n,), target ids (m,),
        scores (n, m) float64, project sign). Estimators that can't do this raise."""
        raise NotImplementedError(f"{self.name} has no train x test attributions")

    def pairwise_vectors(self, ctx: ScoringContext) -> PairwiseVectors:
        """The target vectors of ``pairwise`` when its scores are linear in the stored train
        gradients (``PairwiseVectors``), so they can be streamed block by block with memory
        independent of n; ``pairwise`` then equals ``blockwise.pairwise_matrix`` of them.
        Estimators whose scores are not of that form raise (and keep ``pairwise`` only)."""
        raise NotImplementedError(f"{self.name} has no linear train x test form")

    def pairwise_stream(self, ctx: ScoringContext) -> PairwiseStream:
        """``pairwise`` as a ``PairwiseStream`` of training blocks, for estimators that compute
        their scores block by block from the model (not from ``pairwise_vectors``); ``pairwise``
        then equals the gathered stream. The others raise."""
        raise NotImplementedError(f"{self.name} has no streamed train x test form")

    def refusal(self, num_params: int) -> str | None:
        """Why this estimator cannot run on a model with ``num_params`` trainable parameters,
        naming the option that lifts it (one line); None when it can. Checked before a run."""
        return None

    def streams_pairwise(self) -> bool:
        """Whether ``pairwise`` can be streamed block by block (``streamed.pairwise_stream``):
        the estimator has ``pairwise_vectors`` or ``pairwise_stream``."""
        kind = type(self)
        return (kind.pairwise_vectors is not Estimator.pairwise_vectors
                or kind.pairwise_stream is not Estimator.pairwise_stream)
