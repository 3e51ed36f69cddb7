"""Label noise: flip a fraction of labels, each to a uniformly chosen other class."""

from __future__ import annotations

import numpy as np

from storage.errors import BadInput


def flip_labels(
    labels: np.ndarray, rate: float, num_classes: int, candidates: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flip round(rate * len(candidates)) labels among the ``candidates`` indices.

    Returns (noisy labels (n,) int64, corrupted mask (n,) bool). A flipped label is drawn
    uniformly from the other num_classes - 1 classes.
    """
    rng = np.random.default_rng(seed)
    noisy = labels.astype(np.int64).copy()
    corrupted = np.zeros(len(labels), dtype=bool)
    n_flip = int(round(rate * len(candidates)))
    if n_flip and num_classes < 2:
        raise BadInput(f"label noise needs at least 2 classes; the data has {num_classes}")
    chosen = rng.choice(candidates, size=n_flip, replace=False)
    offsets = rng.integers(1, num_classes, size=n_flip)
    noisy[chosen] = (noisy[chosen] + offsets) % num_classes
    corrupted[chosen] = True
    return noisy, corrupted
