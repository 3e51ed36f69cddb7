"""The run table's utility part: per retraining arm, the fairness gaps and robust accuracy
beside test accuracy (mean ± sd over seeds), and the deletion-prediction correlations."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

from estimators.metrics import sample_sd
from storage.metrics import read_metrics
from storage.store import Store

if TYPE_CHECKING:  # the config is passed in as a value; presentation never imports tasks
    from tasks.config import Config

COLUMNS = {
    "test_accuracy": "test acc %",
    "dp_gap": "DP gap",
    "eop_gap": "EOP (TPR) gap",
    "eo_gap": "EO gap",
    "robust_accuracy": "robust acc %",
}
PERCENT = {"test_accuracy", "robust_accuracy"}


def arm_label(arm: str, config: Config) -> str:
    """'full data', 'random: remove 5%' / 'random: keep 50%', 'if_exact: ...'."""
    q = f"{100 * config.prune.fraction:g}%"
    action = "keep top" if config.prune.mode == "keep" else "remove most harmful"
    if arm == "full":
        return "full data"
    if arm == "random":
        return f"random: {'keep' if config.prune.mode == 'keep' else 'remove'} {q}"
    return f"{arm.removeprefix('pruned:')}: {action} {q}"


def print_utility(console: Console, store: str, run_id: str, config: Config) -> None:
    """Print the arms table when the run measured a utility (gaps or robust accuracy) or kept a
    coreset, and the deletion table when ``deletion.by`` is set; nothing otherwise."""
    rows = read_metrics(Store(store).run(run_id).metrics).to_pylist()
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for m in rows:
        if m["stage"] == "retrain" and m["name"] in COLUMNS and m["seed"] is not None:
            values[m["estimator"]][m["name"]].append(m["value"])
    shown = [c for c in COLUMNS if c != "test_accuracy" and any(c in v for v in values.values())]
    if shown or config.prune.mode == "keep":
        table = Table(title=f"target {config.targets.utility}: retrained models on the test split")
        table.add_column("arm")
        for column in ["test_accuracy", *shown]:
            table.add_column(COLUMNS[column], justify="right")
        for arm, metrics in values.items():
            cells = []
            for column in ["test_accuracy", *shown]:
                v = np.asarray(metrics.get(column, []))
                scale = 100 if column in PERCENT else 1
                digits = 2 if column in PERCENT else 4
                sd = sample_sd(v)
                spread = "–" if np.isnan(sd) else f"{scale * sd:.{digits}f}"
                cells.append(f"{scale * v.mean():.{digits}f} ± {spread}" if v.size else "–")
            table.add_row(arm_label(arm, config), *cells)
        console.print(table)
    deletion = [m for m in rows if m["stage"] == "deletion" and m["name"] == "deletion_pearson"]
    if deletion:
        spearman = {m["estimator"]: m["value"] for m in rows
                    if m["stage"] == "deletion" and m["name"] == "deletion_spearman"}
        table = Table(title=f"deletion prediction: one {config.deletion.by} at a time, predicted "
                            "vs actual change of the target")
        for column in ("estimator", "Pearson", "Spearman"):
            table.add_column(column, justify="left" if column == "estimator" else "right")
        for m in deletion:
            table.add_row(m["estimator"], f"{m['value']:.3f}",
                          f"{spearman.get(m['estimator'], float('nan')):.3f}")
        console.print(table)
