"""Per-sample gradients of a run read from its Parquet shards, shard by shard (a
``GradientSource`` for estimators; no Prefect or estimator imports)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from storage.errors import BadInput
from storage.gradient_shards import complete_shards, iter_gradient_blocks, read_gradient_shard
from storage.store import RunPaths


class StoredGradients:
    """The ``GradientSource`` over a run's gradient shards, read shard by shard.

    The target is the ``target_split`` rows, restricted to ``target_ids`` when given.
    """

    def __init__(
        self, run: RunPaths, target_split: str, target_ids: np.ndarray | None = None
    ) -> None:
        self.run = run
        self.target_split = target_split
        self.target_ids = target_ids

    def _shards(self, checkpoint: int, split: str) -> list[Path]:
        shards = complete_shards(self.run.gradients_dir(checkpoint, split))
        if not shards:
            raise BadInput(f"no gradient shards for checkpoint {checkpoint}, split {split}")
        return shards

    def train_shards(self, checkpoint: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for path in self._shards(checkpoint, "train"):
            yield read_gradient_shard(path)

    def train_blocks(self, checkpoint: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """The train rows shard by shard in row-group blocks (``iter_gradient_blocks``: float32
        views valid until the next block; each shard's checksum is checked after its last block,
        a damaged one raises BadInput there). Memory: a few row groups, whatever n."""
        for path in self._shards(checkpoint, "train"):
            yield from iter_gradient_blocks(path)

    def _target_shards(self, checkpoint: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for path in self._shards(checkpoint, self.target_split):
            ids, grads = read_gradient_shard(path)
            if self.target_ids is not None:
                keep = np.isin(ids, self.target_ids)
                ids, grads = ids[keep], grads[torch.from_numpy(keep)]
            yield ids, grads

    def target(self, checkpoint: int) -> torch.Tensor:
        total = None
        for _, grads in self._target_shards(checkpoint):
            part = grads.to(torch.float64).sum(0)
            total = part if total is None else total + part
        return total

    def target_rows(self, checkpoint: int) -> tuple[np.ndarray, torch.Tensor]:
        parts = list(self._target_shards(checkpoint))
        return np.concatenate([p[0] for p in parts]), torch.cat([p[1] for p in parts])
