"""workloads.noise.flip_labels: how many, where, to what, and reproducibly."""

from __future__ import annotations

import numpy as np
import pytest

from storage.errors import BadInput
from workloads.noise import flip_labels

C = 7


@pytest.fixture
def labels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, C, 500).astype(np.int64)


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.37, 0.5, 0.95])
def test_flips_exactly_round_rate_among_candidates(labels: np.ndarray, rate: float) -> None:
    candidates = np.arange(0, 500, 3)  # 167 candidates
    noisy, corrupted = flip_labels(labels, rate, C, candidates, seed=1)
    assert noisy.dtype == np.int64 and corrupted.dtype == bool
    assert noisy.shape == labels.shape == corrupted.shape
    assert corrupted.sum() == round(rate * len(candidates))
    # only candidates are flipped
    outside = np.setdiff1d(np.arange(500), candidates)
    assert not corrupted[outside].any()
    np.testing.assert_array_equal(noisy[outside], labels[outside])
    # the corrupted mask is exactly where labels changed; every flip lands on another class
    np.testing.assert_array_equal(corrupted, noisy != labels)
    assert noisy.min() >= 0 and noisy.max() < C


def test_input_is_not_modified(labels: np.ndarray) -> None:
    before = labels.copy()
    flip_labels(labels, 0.5, C, np.arange(500), seed=0)
    np.testing.assert_array_equal(labels, before)


def test_deterministic_in_seed(labels: np.ndarray) -> None:
    candidates = np.arange(500)
    a = flip_labels(labels, 0.3, C, candidates, seed=5)
    b = flip_labels(labels, 0.3, C, candidates, seed=5)
    c = flip_labels(labels, 0.3, C, candidates, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert (a[1] != c[1]).any()


def test_rate_zero_flips_nothing(labels: np.ndarray) -> None:
    noisy, corrupted = flip_labels(labels, 0.0, C, np.arange(500), seed=0)
    np.testing.assert_array_equal(noisy, labels)
    assert not corrupted.any()


def test_flipped_labels_spread_over_other_classes() -> None:
    labels = np.zeros(4000, dtype=np.int64)
    noisy, corrupted = flip_labels(labels, 0.5, 4, np.arange(4000), seed=0)
    counts = np.bincount(noisy[corrupted], minlength=4)
    assert counts[0] == 0
    # 2,000 flips over classes 1..3: each near 667
    assert (np.abs(counts[1:] - 2000 / 3) < 100).all(), counts


def test_two_classes_always_swap() -> None:
    labels = np.array([0, 1] * 50, dtype=np.int64)
    noisy, corrupted = flip_labels(labels, 0.4, 2, np.arange(100), seed=2)
    np.testing.assert_array_equal(noisy[corrupted], 1 - labels[corrupted])


def test_one_class_cannot_be_flipped() -> None:
    with pytest.raises(BadInput, match="2 classes"):
        flip_labels(np.zeros(10, dtype=np.int64), 0.5, 1, np.arange(10), seed=0)
