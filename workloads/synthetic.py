"""A synthetic classification workload of any size, for scale tests and benchmarks.

n samples of ``input_dim`` features: sample i has a label drawn uniformly from ``classes`` and
features ``mean[label] + N(0, I)``, with seeded class means at distance ``separation`` from the
origin. Rows are generated in fixed blocks of ``BLOCK`` rows, block b from
``SeedSequence([seed, 31, b])``, so any worker can rebuild any rows (``synthetic_rows``) and
the data never depends on how it is cut. The model is the MLP of width ``model.hidden``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workloads.datasets import Samples, assign_splits

BLOCK = 65_536


@dataclass(frozen=True)
class SyntheticSpec:
    """Size of a synthetic workload: samples, feature width, classes; ``separation`` is the
    distance of each class mean from the origin (larger: easier)."""

    n: int
    input_dim: int
    classes: int
    seed: int = 0
    separation: float = 3.0

    def __post_init__(self) -> None:
        if self.n < 1 or self.input_dim < 1 or self.classes < 2:
            raise ValueError("synthetic workload needs n >= 1, input_dim >= 1, classes >= 2")

    def class_means(self) -> np.ndarray:
        """(classes, input_dim) float32, each of norm ``separation``."""
        rng = np.random.default_rng([self.seed, 31])
        means = rng.standard_normal((self.classes, self.input_dim))
        means *= self.separation / np.linalg.norm(means, axis=1, keepdims=True)
        return means.astype(np.float32)


def synthetic_rows(spec: SyntheticSpec, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Features (stop - start, input_dim) float32 and labels (stop - start,) int64 of rows
    [start, stop) (the same values whatever range they are asked in)."""
    if not 0 <= start <= stop <= spec.n:
        raise ValueError(f"rows [{start}, {stop}) outside [0, {spec.n})")
    means = spec.class_means()
    xs, ys = [], []
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1 if stop > start else 0):
        rng = np.random.default_rng([spec.seed, 31, block])
        rows = min(BLOCK, spec.n - block * BLOCK)
        y = rng.integers(0, spec.classes, rows)
        x = rng.standard_normal((rows, spec.input_dim), dtype=np.float32) + means[y]
        lo = max(start - block * BLOCK, 0)
        hi = min(stop - block * BLOCK, rows)
        xs.append(x[lo:hi])
        ys.append(y[lo:hi])
    if not xs:
        return np.zeros((0, spec.input_dim), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def load_synthetic(spec: SyntheticSpec, fractions: dict[str, float]) -> Samples:
    """The whole workload as ``Samples`` (seeded train/val/test split; clean labels known)."""
    x, label = synthetic_rows(spec, 0, spec.n)
    return Samples(
        sample_id=np.arange(spec.n, dtype=np.int64),
        inputs={"features": x},
        label=label,
        split=assign_splits(spec.n, fractions, spec.seed),
        num_classes=spec.classes,
        input_shape=(spec.input_dim,),
        clean_label=label.copy(),
        corrupted=np.zeros(spec.n, dtype=bool),
    )
