"""Figures of the HTML report, as PNG bytes (matplotlib, Agg backend): the training loss, score
histograms, noisy-label detection curves, one small image per training sample, and the decision
boundary of a 2-feature model with each estimator's most harmful points."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _thin(x: np.ndarray, y: np.ndarray, points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` evenly spaced points of a curve (first and last kept), so a figure of
    millions of samples stays small and quick to draw."""
    if len(x) <= points:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, points).round().astype(int))
    return x[keep], y[keep]


def loss_curve(steps: np.ndarray, losses: np.ndarray) -> bytes:
    """Training loss of every optimizer step (model 0), with a moving average."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax.plot(*_thin(steps, losses), color="#9ab", linewidth=0.7, label="step")
    window = max(1, len(losses) // 30)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(*_thin(steps[window - 1:], smooth), color="#247",
                label=f"mean of {window} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    return _png(fig)


def score_histograms(scores: dict[str, np.ndarray]) -> bytes:
    """One histogram of the training samples' scores per estimator (corruption unknown)."""
    names = list(scores)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        ax.hist(scores[name], bins=40, color="#4c72b0")
        ax.set_title(name)
        ax.set_xlabel("score (>0 helps the target)")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _png(fig)


def detection_roc(scores: dict[str, np.ndarray], corrupted: dict[str, np.ndarray]) -> bytes:
    """ROC curve per estimator of −score (most harmful first) against the corrupted labels;
    ``scores[e]`` and ``corrupted[e]`` (n,) are aligned."""
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    for name, score in scores.items():
        fpr, tpr, _ = roc_curve(corrupted[name].astype(int), -score)
        ax.plot(*_thin(fpr, tpr), label=name)
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
    ax.set_xlabel("false positive rate (clean samples flagged)")
    ax.set_ylabel("true positive rate (corrupted found)")
    ax.set_title("noisy-label detection: ROC of −score")
    ax.legend(fontsize=7)
    return _png(fig)


def found_curves(scores: dict[str, np.ndarray], corrupted: dict[str, np.ndarray]) -> bytes:
    """Fraction of all corrupted samples among the q most harmful (score ascending, stable), per
    estimator, against random inspection and a perfect ranking."""
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    for name, score in scores.items():
        bad = corrupted[name][np.argsort(score, kind="stable")].astype(float)
        inspected = np.arange(1, len(bad) + 1) / len(bad)
        ax.plot(*_thin(inspected, np.cumsum(bad) / max(1.0, bad.sum())), label=name)
    share = float(np.mean(next(iter(corrupted.values()))))
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="random")
    ax.plot([0, share, 1], [0, 1, 1], color="black", linestyle="--", linewidth=0.8,
            label="perfect")
    ax.set_xlabel("fraction of training samples inspected (most harmful first)")
    ax.set_ylabel("fraction of corrupted samples found")
    ax.set_title("detection: corrupted found vs inspected")
    ax.legend(fontsize=7)
    return _png(fig)


def sample_image(pixels: np.ndarray, vmin: float, vmax: float) -> bytes:
    """A PNG of one sample at its native resolution: ``pixels`` (H, W) in gray (dark = high) or
    (H, W, 3) in color, scaled from [vmin, vmax]."""
    buf = io.BytesIO()
    if pixels.ndim == 2:
        plt.imsave(buf, pixels, cmap="gray_r", vmin=vmin, vmax=vmax, format="png")
    else:
        scaled = np.clip((pixels - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
        plt.imsave(buf, scaled, format="png")
    return buf.getvalue()


@dataclass(frozen=True)
class Boundary:
    """A 2-feature model's decision regions and its training points, for the sanity-check
    figure. ``grid_x`` (G,), ``grid_y`` (H,), ``predicted`` (H, G) class of each grid cell;
    ``points`` (n, 2), ``labels`` (n,) as trained on, ``corrupted`` (n,) bool, ``sample_ids``
    (n,); ``harmful`` {estimator: sample ids of its k most harmful training samples}."""

    grid_x: np.ndarray
    grid_y: np.ndarray
    predicted: np.ndarray
    points: np.ndarray
    labels: np.ndarray
    corrupted: np.ndarray
    sample_ids: np.ndarray
    harmful: dict[str, np.ndarray]


def decision_boundaries(b: Boundary) -> bytes:
    """One panel per estimator: the decision regions, the training points by label (mislabeled
    ones outlined in red) and that estimator's most harmful points circled, with how many of
    them are mislabeled in the title."""
    names = list(b.harmful)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.6 * rows), squeeze=False)
    position = {int(s): i for i, s in enumerate(b.sample_ids)}
    for ax, name in zip(axes.flat, names, strict=False):
        ax.contourf(b.grid_x, b.grid_y, b.predicted, alpha=0.18, cmap="coolwarm",
                    levels=np.arange(b.predicted.max() + 2) - 0.5)
        ax.scatter(*b.points.T, c=b.labels, cmap="coolwarm", s=9, vmin=0,
                   vmax=max(1, int(b.labels.max())), linewidths=0)
        bad = b.corrupted
        ax.scatter(*b.points[bad].T, facecolors="none", edgecolors="#c33", s=22, linewidths=0.8)
        picked = np.array([position[int(s)] for s in b.harmful[name] if int(s) in position],
                          dtype=int)
        ax.scatter(*b.points[picked].T, facecolors="none", edgecolors="black", s=70,
                   linewidths=1.1)
        found = int(bad[picked].sum()) if len(picked) else 0
        ax.set_title(f"{name}: {found}/{len(picked)} mislabeled", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    return _png(fig)
