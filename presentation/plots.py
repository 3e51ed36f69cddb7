"""Figures logged as MLflow artifacts (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from estimators.base import Attribution  # noqa: E402
from estimators.metrics import sample_sd  # noqa: E402
from storage.atomic import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` to ``path`` as PNG atomically (a reader never sees half an image)."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def score_distributions(
    attributions: dict[str, Attribution], corrupted: dict[int, bool], path: Path
) -> Path:
    """One histogram per estimator: scores of clean vs corrupted training samples."""
    names = list(attributions)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        a = attributions[name]
        bad = np.array([corrupted[int(i)] for i in a.sample_ids])
        bins = np.histogram_bin_edges(a.score, bins=40)
        ax.hist(a.score[~bad], bins=bins, alpha=0.6, label="clean", density=True)
        ax.hist(a.score[bad], bins=bins, alpha=0.6, label="corrupted", density=True)
        ax.set_title(name)
        ax.set_xlabel("score (>0 helps the target)")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend()
    fig.tight_layout()
    _save(fig, path)
    return path


def accuracy_comparison(arms: dict[str, list[float]], path: Path) -> Path:
    """Test accuracy per arm (full data, random removal, pruned by X): mean ± sd over seeds."""
    names = list(arms)
    means = [float(np.mean(arms[n])) for n in names]
    sds = np.nan_to_num([sample_sd(arms[n]) for n in names])  # one seed: no bar
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.6))
    ax.bar(names, means, yerr=sds, capsize=4, color="#4c72b0")
    for i, n in enumerate(names):
        ax.scatter([i] * len(arms[n]), arms[n], color="black", s=8, zorder=3)
    low = min(min(v) for v in arms.values())
    ax.set_ylim(max(0.0, low - 0.03), min(1.0, max(max(v) for v in arms.values()) + 0.02))
    ax.set_ylabel("test accuracy")
    ax.set_title("retrained test accuracy (mean ± sd over seeds)")
    fig.tight_layout()
    _save(fig, path)
    return path


def lds_bars(table: dict[str, dict[str, float]], path: Path) -> Path:
    """LDS per estimator with its 95% confidence interval."""
    names = list(table)
    means = [table[n]["lds"] for n in names]
    low = [table[n]["lds"] - table[n]["lds_low"] for n in names]
    high = [table[n]["lds_high"] - table[n]["lds"] for n in names]
    fig, ax = plt.subplots(figsize=(0.8 * len(names) + 2, 3.6))
    ax.bar(names, means, yerr=np.nan_to_num([low, high]), capsize=4, color="#55a868")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("LDS (Spearman, mean over targets)")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    _save(fig, path)
    return path


def prune_curves(
    accuracy: dict[str, list[float]], estimators: list[str], fractions: list[float], path: Path
) -> Path:
    """Test accuracy after removing the q most harmful samples, per estimator, against random
    removal of the same number (mean ± sd over seeds)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [100 * q for q in fractions]
    for name in [*estimators, "random"]:
        values = [accuracy[f"{name}@{q}"] for q in fractions]
        style = {"color": "black", "linestyle": "--"} if name == "random" else {}
        spread = np.nan_to_num([sample_sd(v) for v in values])  # one seed: no bar
        ax.errorbar(xs, [np.mean(v) for v in values], yerr=spread,
                    label=name, capsize=2, marker="o", markersize=3, **style)
    ax.axhline(np.mean(accuracy["full"]), color="gray", linewidth=0.8, label="full data")
    ax.set_xlabel("% of training samples removed")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return path
