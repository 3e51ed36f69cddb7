"""Issue 15's external digits MLP as a ``model.factory``: a 64-128-10 ReLU net (9,610
parameters) on standardized features, and the config overrides of its workload.

The external group trained on sklearn digits standardized with the training rows' statistics,
1,200 train / 300 test, SGD with momentum 0.9, batch 64, 30 epochs, lr 0.05 -> 0.005 at epoch
20, weight decay 5e-4, no label noise. Sieve feeds digits as [0, 1] pixels, so the model's first
operation standardizes them with fixed per-feature mean and std (buffers, not parameters) of the
train split that ``OVERRIDES`` gives (``FRACTIONS``, seed ``SEED``): the same as training on
standardized features. A feature constant over those rows gets std 1.

    python -m benchmarks.quality --workloads digits-relu-mlp ...
    PYTHONPATH=. sieve evaluate --set model.factory=benchmarks.external_mlp:make ... (OVERRIDES)
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch
from torch import nn

FRACTIONS = {"train": 0.667, "val": 0.166, "test": 0.167}
"""1,199 train / 298 val / 300 test of digits' 1,797 rows (the external split: 1,200 / 300)."""
SEED = 0
"""``seed`` of the run, which fixes Sieve's split (``workloads.datasets.assign_splits``)."""

OVERRIDES = [
    f"seed={SEED}", "data.name=digits", "data.noise=0",
    "data.splits={" + ", ".join(f"{k}: {v}" for k, v in FRACTIONS.items()) + "}",
    "model.factory=benchmarks.external_mlp:make",
    "train.epochs=30", "train.batch_size=64", "train.optimizer=sgd", "train.lr=0.05",
    "train.momentum=0.9", "train.schedule=step", "train.step_epochs=20", "train.gamma=0.1",
    "train.weight_decay=5e-4",
]
"""``--set`` overrides (onto the embedded default) that make Sieve's run this workload."""


class Standardize(nn.Module):
    """x -> (x - mean) / std per feature, with fixed (non-trainable) mean and std."""

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@cache
def train_moments() -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (ddof 0, 0 -> 1) of the digits train rows of Sieve's split."""
    from workloads.datasets import load_digits

    samples = load_digits(FRACTIONS, SEED)
    x = samples.x[samples.indices("train")].astype(np.float64)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    return x.mean(axis=0), std


def make(num_classes: int) -> nn.Module:
    """Standardize, then Linear(64, 128), ReLU, Linear(128, num_classes)."""
    mean, std = train_moments()
    return nn.Sequential(Standardize(mean, std), nn.Linear(len(mean), 128), nn.ReLU(),
                         nn.Linear(128, num_classes))
