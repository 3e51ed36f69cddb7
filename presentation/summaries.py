"""What a flow returns and the CLI shows: plain dataclasses, filled by flows/, printed by
presentation/ (so neither imports the other's modules for them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from estimators.metrics import sample_sd


@dataclass
class RunSummary:
    """What ``sieve run`` prints: per-estimator metrics and retrained accuracies per arm."""

    run_id: str
    store: str
    mlflow_run_id: str
    estimators: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: dict[str, list[float]] = field(default_factory=dict)
    report: str | None = None  # runs/<run_id>/report.html
    confidence: dict | None = None  # runs/<run_id>/confidence.json (data with a confidence)


@dataclass
class EvaluationSummary:
    run_id: str
    store: str
    mlflow_run_id: str
    table: dict[str, dict[str, float]] = field(default_factory=dict)
    report: str | None = None  # runs/<run_id>/report.html


@dataclass
class MultistageSummary:
    """What ``sieve run`` prints for a multistage config: per-estimator score metrics (and
    leave-one-out correlations), and per arm the finetune test loss/accuracy per seed."""

    run_id: str
    store: str
    mlflow_run_id: str
    estimators: dict[str, dict[str, float]] = field(default_factory=dict)
    arms: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    report: str | None = None

    @property
    def table(self) -> dict[str, dict[str, float]]:
        """One row per estimator (its metrics) and per arm (``arm:<name>``: mean and sd over
        seeds of the finetune test loss and accuracy), as ``--json`` prints them."""
        rows = {name: dict(row) for name, row in self.estimators.items()}
        for arm, values in self.arms.items():
            rows[f"arm:{arm}"] = {f"{metric}_{stat}": float(fn(per_seed))
                                  for metric, per_seed in values.items()
                                  for stat, fn in (("mean", np.mean), ("sd", sample_sd))}
        return rows
