"""``--json`` output of ``sieve run`` / ``sieve evaluate``: one JSON object for scripts.

Keys: ``command`` ("run" or "evaluate"), ``run_id``, ``store``, ``mlflow_run_id``, ``report``
(absolute path of report.html, or null), ``seconds``, ``rows`` (one object per estimator:
``estimator`` plus its metrics; NaN and infinities become null; an estimator the run skipped
has only ``estimator`` and ``skipped``, the reason) and, for ``run``, ``accuracy`` ({arm: [test
accuracy per retrain seed]}). Accuracies are fractions, not percent.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from estimators.metrics import sample_sd
from presentation.summaries import EvaluationSummary, RunSummary


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _run_rows(summary: RunSummary) -> list[dict[str, Any]]:
    """Per estimator: the score-stage metrics, and for pruned estimators the retrained test
    accuracy (mean, sd over seeds) with its difference to the full-data and random arms."""
    acc = summary.accuracy
    full, random = acc.get("full", []), acc.get("random", [])
    rows = []
    for name, metrics in summary.estimators.items():
        row: dict[str, Any] = {"estimator": name, **metrics}
        pruned = acc.get(f"pruned:{name}")
        if pruned:
            row["pruned_test_accuracy_mean"] = float(np.mean(pruned))
            row["pruned_test_accuracy_sd"] = sample_sd(pruned)  # NaN (null) for one seed
            if full:
                row["pruned_vs_full"] = float(np.mean(pruned) - np.mean(full))
            if random:
                row["pruned_vs_random"] = float(np.mean(pruned) - np.mean(random))
        rows.append(row)
    return rows


def summary_json(summary: RunSummary | EvaluationSummary, seconds: float,
                 skipped: dict[str, str] | None = None) -> str:
    """The one-line JSON object printed by ``--json``; ``skipped``: {estimator: reason} of the
    estimators the run skipped (``Config.skipped``)."""
    out: dict[str, Any] = {
        "command": "evaluate" if isinstance(summary, EvaluationSummary) else "run",
        "run_id": summary.run_id,
        "store": summary.store,
        "mlflow_run_id": summary.mlflow_run_id,
        "report": summary.report,
        "seconds": seconds,
    }
    if isinstance(summary, RunSummary):
        out["rows"] = _run_rows(summary)
        out["accuracy"] = summary.accuracy
        if summary.confidence:
            out["confidence"] = summary.confidence
    else:
        out["rows"] = [{"estimator": name, **row} for name, row in summary.table.items()]
    out["rows"] += [{"estimator": name, "skipped": reason}
                    for name, reason in (skipped or {}).items()]
    return json.dumps(_finite(out), allow_nan=False)
