"""Noisy-label detection metrics: rank training samples by suspicion (higher = more suspect);
and the sample standard deviation every "± sd" over seeds reports."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import roc_auc_score


def detection_auc(suspicion: np.ndarray, corrupted: np.ndarray) -> float:
    """ROC-AUC of ``suspicion`` (n,) for the binary labels ``corrupted`` (n,), flipped = 1.

    0.5 is chance, 1.0 ranks every corrupted sample above every clean one. Needs both classes.
    """
    suspicion, labels = _check(suspicion, corrupted)
    if labels.all() or not labels.any():
        raise ValueError("detection_auc needs both corrupted and clean samples")
    return float(roc_auc_score(labels.astype(np.int64), suspicion))


def precision_at_k(suspicion: np.ndarray, corrupted: np.ndarray, k: int) -> float:
    """Fraction of corrupted samples among the ``k`` most suspicious (ties broken by position)."""
    suspicion, labels = _check(suspicion, corrupted)
    if not 1 <= k <= len(labels):
        raise ValueError(f"k must be in [1, {len(labels)}], got {k}")
    return float(labels[_ranking(suspicion)[:k]].mean())


def found_fraction(suspicion: np.ndarray, corrupted: np.ndarray, top_fraction: float) -> float:
    """Fraction of all corrupted samples found among the top ``ceil(top_fraction * n)`` most
    suspicious samples (recall at that inspection budget); ``top_fraction`` in (0, 1]."""
    suspicion, labels = _check(suspicion, corrupted)
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    if not labels.any():
        raise ValueError("found_fraction needs at least one corrupted sample")
    k = math.ceil(top_fraction * len(labels))
    return float(labels[_ranking(suspicion)[:k]].sum() / labels.sum())


def _ranking(suspicion: np.ndarray) -> np.ndarray:
    """Indices from most to least suspicious; equal values keep their input order."""
    return np.argsort(-suspicion, kind="stable")


def _check(suspicion: np.ndarray, corrupted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(suspicion, dtype=np.float64)
    c = np.asarray(corrupted).astype(bool)
    if s.ndim != 1 or s.shape != c.shape:
        raise ValueError(f"suspicion {s.shape} and corrupted {c.shape} must be equal 1-D shapes")
    if not np.isfinite(s).all():
        raise ValueError("suspicion contains NaN or infinite values")
    return s, c


def sample_sd(values) -> float:
    """The sample standard deviation (ddof=1) of ``values``: what "± sd" over seeds reports;
    NaN for fewer than 2 values (undefined, not 0)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.std(ddof=1)) if v.size >= 2 else math.nan
