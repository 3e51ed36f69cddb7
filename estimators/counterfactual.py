"""Counterfactual evaluation metrics: attributions against retraining outcomes (spec §9).

Plain numpy; the retraining itself lives in the pipeline (tasks/groundtruth.py).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr, t


def loo_correlation(score: np.ndarray, delta: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman) of predicted scores (k,) with leave-one-out truths (k,), where
    ``delta_i = U(theta_without_i) - U(theta)``; positive = the estimator's sign is right."""
    score, delta = np.asarray(score, float), np.asarray(delta, float)
    if score.shape != delta.shape or score.ndim != 1 or len(score) < 3:
        raise ValueError("loo_correlation needs two equal 1-D arrays of >= 3 values")
    if np.ptp(score) == 0 or np.ptp(delta) == 0:
        return float("nan"), float("nan")
    return float(pearsonr(score, delta)[0]), float(spearmanr(score, delta)[0])


def lds(attributions: np.ndarray, subsets: np.ndarray, outcomes: np.ndarray) -> np.ndarray:
    """Linear datamodeling score per target (T,).

    attributions (n, T): score of training sample i for target t (positive = raises t's
    reward); subsets (M, n) bool: the training samples kept in retrain j; outcomes (M, T): the
    target's measured reward (e.g. margin, mean over seeds) after retrain j. LDS(t) is the
    Spearman correlation over j of ``sum_{i in S_j} attributions[i, t]`` with ``outcomes[j, t]``
    (NaN where either side is constant).
    """
    subsets = np.asarray(subsets, dtype=np.float64)
    predicted = subsets @ np.asarray(attributions, dtype=np.float64)  # (M, T)
    out = np.full(predicted.shape[1], np.nan)
    for j in range(predicted.shape[1]):
        if np.ptp(predicted[:, j]) > 0 and np.ptp(outcomes[:, j]) > 0:
            out[j] = spearmanr(predicted[:, j], outcomes[:, j])[0]
    return out


def mean_ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t confidence interval of the mean, NaNs dropped."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(t.ppf(0.5 + level / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half
