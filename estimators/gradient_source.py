"""Per-sample gradients held in memory: a ``GradientSource`` for library users and tests.

Gradients are flattened in ``parameter_order(model)``; rows keep the dtype they were given
(the stored pipeline source uses float32, tests use float64). ``target`` is always float64.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from estimators.base import Checkpoint, ScoringContext
from estimators.per_sample import per_sample_gradients
from estimators.targets import SummedLoss, Target
from workloads.inputs import Inputs, to_device


class InMemoryGradients:
    """Train gradients (n, d) and summed target gradients (d,) per checkpoint index.

    ``train_grads`` / ``target_grads`` map ``Checkpoint.index`` to tensors; a sequence is read as
    ``{0: seq[0], 1: seq[1], ...}``. ``train_shards`` yields row blocks of ``shard_size``.
    """

    def __init__(
        self,
        train_ids: np.ndarray,
        train_grads: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
        target_grads: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
        shard_size: int = 512,
        target_rows: Mapping[int, torch.Tensor] | Sequence[torch.Tensor] | None = None,
        target_ids: np.ndarray | None = None,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.train_ids = np.asarray(train_ids, dtype=np.int64)
        self._train = _as_mapping(train_grads)
        self._target = _as_mapping(target_grads)
        self.shard_size = shard_size
        self._target_rows = _as_mapping(target_rows) if target_rows is not None else None
        self.target_ids = None if target_ids is None else np.asarray(target_ids, dtype=np.int64)
        if set(self._train) != set(self._target):
            raise ValueError("train_grads and target_grads must cover the same checkpoints")
        for index, g in self._train.items():
            if g.ndim != 2 or g.shape[0] != len(self.train_ids):
                raise ValueError(
                    f"checkpoint {index}: train gradients must be (n={len(self.train_ids)}, d), "
                    f"got {tuple(g.shape)}"
                )
            if self._target[index].shape != (g.shape[1],):
                raise ValueError(f"checkpoint {index}: target gradient must have shape (d,)")

    @property
    def checkpoints(self) -> list[int]:
        """The checkpoint indices held, sorted."""
        return sorted(self._train)

    @property
    def has_target_rows(self) -> bool:
        """Whether per-row target gradients are held (``target_rows`` works)."""
        return self._target_rows is not None

    def train_matrix(self, checkpoint: int) -> torch.Tensor:
        """All train gradients at ``checkpoint``: (n, d), rows aligned with ``train_ids``."""
        return self._train[self._check(checkpoint)]

    def train_shards(self, checkpoint: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Yield (sample_ids (m,), gradients (m, d)) blocks, in ``train_ids`` order."""
        grads = self._train[self._check(checkpoint)]
        for start in range(0, len(self.train_ids), self.shard_size):
            stop = start + self.shard_size
            yield self.train_ids[start:stop], grads[start:stop]

    def target(self, checkpoint: int) -> torch.Tensor:
        """The summed target gradient g_V at ``checkpoint``: (d,), float64."""
        return self._target[self._check(checkpoint)].to(torch.float64)

    def target_rows(self, checkpoint: int) -> tuple[np.ndarray, torch.Tensor]:
        """Per-sample target gradients (target ids (m,), (m, d)), for pairwise scores."""
        if self._target_rows is None:
            raise ValueError("these gradients hold only the summed target; pass target_rows")
        rows = self._target_rows[self._check(checkpoint)]
        ids = self.target_ids if self.target_ids is not None else np.arange(rows.shape[0])
        return ids, rows

    def _check(self, checkpoint: int) -> int:
        if checkpoint not in self._train:
            raise KeyError(f"no gradients for checkpoint {checkpoint}; held: {self.checkpoints}")
        return checkpoint

    @classmethod
    def compute(
        cls,
        model_factory: Callable[[], nn.Module],
        checkpoints: Sequence[Checkpoint],
        train_ids: np.ndarray,
        train_x: Inputs,
        train_y: torch.Tensor,
        target_x: Inputs,
        target_y: torch.Tensor,
        shard_size: int = 512,
        chunk_size: int = 256,
        device: torch.device | str = "cpu",
        target_ids: np.ndarray | None = None,
        target: Target | None = None,
    ) -> InMemoryGradients:
        """Per-sample cross-entropy gradients of the train rows, per-row gradients of the target
        rows and the target gradient grad U (``target``, default the summed loss), at every
        checkpoint, with the model in eval mode (no weight-decay term in the gradients). Rows
        have the model's dtype. A target that is not a sum over rows has no per-row gradients."""
        target = target or SummedLoss()
        train_grads: dict[int, torch.Tensor] = {}
        target_grads: dict[int, torch.Tensor] = {}
        target_rows: dict[int, torch.Tensor] | None = {} if target.decomposable else None
        for ckpt in checkpoints:
            model = model_factory().to(device)
            model.load_state_dict(ckpt.load())
            model.eval()
            train_grads[ckpt.index] = per_sample_gradients(
                model, to_device(train_x, device), train_y.to(device), chunk_size=chunk_size
            )
            if target_rows is not None:
                target_rows[ckpt.index] = per_sample_gradients(
                    model, to_device(target_x, device), target_y.to(device), chunk_size=chunk_size,
                    cost=target.cost,
                )
            target_grads[ckpt.index] = target.gradient(
                model, to_device(target_x, device), target_y.to(device), chunk_size=chunk_size
            )
        return cls(train_ids, train_grads, target_grads, shard_size=shard_size,
                   target_rows=target_rows, target_ids=target_ids)

    @classmethod
    def from_context(
        cls, ctx: ScoringContext, checkpoints: str = "all", shard_size: int = 512
    ) -> InMemoryGradients:
        """``compute`` on a ``ScoringContext``; ``checkpoints`` is "all" or "final"."""
        if checkpoints not in ("all", "final"):
            raise ValueError(f'checkpoints must be "all" or "final", got {checkpoints!r}')
        chosen = ctx.checkpoints if checkpoints == "all" else [ctx.final]
        return cls.compute(
            ctx.model_factory,
            chosen,
            ctx.train_ids,
            ctx.train_x,
            ctx.train_y,
            ctx.target_x,
            ctx.target_y,
            shard_size=shard_size,
            device=ctx.device,
            target_ids=ctx.target_ids,
            target=ctx.target,
        )


def summed_loss_gradient(
    model: nn.Module, x: Inputs, y: torch.Tensor, chunk_size: int = 256
) -> torch.Tensor:
    """Gradient of ``sum_i cross_entropy(model(x_i), y_i)``: (d,), float64, in parameter order.

    The model is used as given (call ``eval()`` first).
    """
    return SummedLoss().gradient(model, x, y, chunk_size=chunk_size)


def _as_mapping(
    grads: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
) -> dict[int, torch.Tensor]:
    if isinstance(grads, Mapping):
        return {int(k): v for k, v in grads.items()}
    return dict(enumerate(grads))
