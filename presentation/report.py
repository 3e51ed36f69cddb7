"""What the CLI prints: the run table and where to look next, and the list of runs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

from estimators.metrics import sample_sd
from presentation.confidence_table import print_confidence
from presentation.summaries import EvaluationSummary, MultistageSummary, RunSummary
from presentation.utility_report import arm_label, print_utility
from storage.location import is_url
from storage.metrics import read_metrics
from storage.store import Store
from storage.yaml12 import load_yaml

if TYPE_CHECKING:  # the config is passed in as a value; presentation never imports tasks
    from tasks.config import Config


def _console() -> Console:
    """A console that doesn't squeeze tables into 80 columns when output is piped."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def _mean_sd(values: list[float], scale: float = 100, digits: int = 2) -> str:
    """``mean ± sd`` (sample sd, ddof=1; "–" for the sd of one value)."""
    sd = sample_sd(values)
    spread = "–" if np.isnan(sd) else f"{scale * sd:.{digits}f}"
    return f"{scale * np.mean(values):.{digits}f} ± {spread}"


def _delta(values: list[float], reference: list[float]) -> str:
    return f"{100 * (np.mean(values) - np.mean(reference)):+.2f}"


def print_run_summary(summary: RunSummary, config: Config, seconds: float) -> None:
    console = _console()
    acc = summary.accuracy
    full, random = acc.get("full", []), acc.get("random", [])
    table = Table(title=f"sieve run {summary.run_id}  ({seconds:.0f} s)")
    for column in ("estimator", "seconds", "detection AUC (−score)", "suspicion AUC",
                   "test acc % pruned", "vs full", "vs random"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for name, row in summary.estimators.items():
        pruned = acc.get(f"pruned:{name}")
        table.add_row(
            name,
            f"{row['seconds']:.2f}",
            f"{row['detection_auc']:.3f}" if "detection_auc" in row else "–",
            f"{row['suspicion_auc']:.3f}" if "suspicion_auc" in row else "–",
            _mean_sd(pruned) if pruned else "–",
            _delta(pruned, full) if pruned else "",
            _delta(pruned, random) if pruned else "",
        )
    _skipped_rows(table, config)
    console.print(table)
    _print_attributed(console, summary.store, summary.run_id, config)
    n = len(full)
    console.print(
        f"test accuracy %, mean ± sd over {n} seeds: full data {_mean_sd(full)}, "
        f"{arm_label('random', config)} {_mean_sd(random)}"
    )
    print_utility(console, summary.store, summary.run_id, config)
    print_confidence(console, summary.confidence)
    store = summary.store
    _print_report(console, summary.report)
    console.print(
        "\nnext:\n"
        f"  sieve query --store {store} --run {summary.run_id} "
        "\"select estimator, avg(score) from scores group by 1\"\n"
        f"  mlflow ui --backend-store-uri {Store(store).mlflow_uri}   "
        f"(parent run {summary.mlflow_run_id})"
    )


def _skipped_rows(table: Table, config: Config) -> None:
    """One row per estimator the run skipped: its name, then ``skipped: <reason>``."""
    for name, reason in config.skipped.items():
        table.add_row(name, f"skipped: {reason}", *[""] * (len(table.columns) - 2))


def _print_attributed(console: Console, store: str, run_id: str, config: Config) -> None:
    """``attributed parameters: d of D trainable (model.modules ...)`` from the train stage."""
    rows = read_metrics(Store(store).run(run_id).metrics).to_pylist()
    count = {m["name"]: int(m["value"]) for m in rows if m["stage"] == "train"
             and m["name"] in ("attributed_parameters", "trainable_parameters")}
    if len(count) == 2:
        which = (f"model.modules {config.model.modules}" if config.model.modules
                 else "every trainable parameter")
        console.print(f"attributed parameters: {count['attributed_parameters']:,} of "
                      f"{count['trainable_parameters']:,} trainable ({which})")


def _print_report(console: Console, report: str | None) -> None:
    """``report: file:///.../runs/<id>/report.html`` (the run's HTML report; its URL in a URL
    store), when written."""
    if report:
        link = report if is_url(report) else Path(report).as_uri()
        console.print(f"report: {link}", soft_wrap=True, markup=False,
                      highlight=False)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _interval(row: dict, key: str) -> str:
    """``mean [low, high]`` of metric ``key`` (LDS), or a dash."""
    if key not in row:
        return "–"
    return f"{row[key]:.3f} [{row[key + '_low']:.3f}, {row[key + '_high']:.3f}]"


def print_evaluation(summary: EvaluationSummary, config: Config, seconds: float) -> None:
    table = Table(title=f"sieve evaluate {summary.run_id}  ({seconds:.0f} s)")
    fractions = config.evaluate.prune_curve.fractions
    q = min(fractions, key=lambda f: abs(f - 0.10))
    fresh = config.evaluate.lds.fresh_seeds > 0
    for column in ("estimator", "LDS (95% CI)", *(["fresh-seed LDS (95% CI)"] if fresh else []),
                   "LOO Pearson", "LOO Spearman", "detection AUC",
                   f"prune gain @{100 * q:g}% (pts)", "seconds (summed / pairwise)", "peak MiB"):
        table.add_column(column, justify="left" if column == "estimator" else "right")
    for spec in config.estimators:
        row = summary.table[spec.name]
        lds = [_interval(row, "lds"), *([_interval(row, "lds_fresh")] if fresh else [])]
        gain = row.get(f"prune_gain@{q}")
        seconds = _fmt(row.get("seconds"), 2) + (
            f" / {row['pairwise_seconds']:.2f}" if "pairwise_seconds" in row else "")
        table.add_row(spec.name, *lds, _fmt(row.get("loo_pearson")),
                      _fmt(row.get("loo_spearman")), _fmt(row.get("detection_auc")),
                      _fmt(None if gain is None else 100 * gain, 2),
                      seconds, _fmt(row.get("peak_mb"), 1))
    _skipped_rows(table, config)
    console = _console()
    console.print(table)
    _print_attributed(console, summary.store, summary.run_id, config)
    full = summary.table["full_data"]["test_accuracy"]
    rand = summary.table["random_removal"][f"prune_accuracy@{q}"]
    console.print(f"test accuracy: full data {100 * full:.2f}%, random removal of "
                  f"{100 * q:g}% {100 * rand:.2f}%")
    _print_report(console, summary.report)
    console.print(
        f"\nnext:\n  sieve query --store {summary.store} --run {summary.run_id} "
        "\"select * from evaluation where metric = 'lds' order by value desc\"\n"
        f"  mlflow ui --backend-store-uri {Store(summary.store).mlflow_uri}"
    )


def print_multistage(summary: MultistageSummary, config: Config, seconds: float) -> None:
    """The multistage run table: per arm the finetune test loss after re-pretraining and
    re-finetuning (mean ± sd over seeds), and per estimator its leave-one-out correlations."""
    console = _console()
    arms = summary.arms
    random = arms.get("random", {}).get("test_loss", [])
    table = Table(title=f"sieve run {summary.run_id}  multistage, finetune "
                        f"{config.multistage.finetune}  ({seconds:.0f} s)")
    for column in ("removed from pretraining", "finetune test loss", "vs random",
                   "test acc %", "LOO Pearson", "LOO Spearman"):
        table.add_column(column, justify="left" if column.startswith("removed") else "right")
    q = f"{100 * config.prune.fraction:g}%"
    for arm, values in arms.items():
        loss = values["test_loss"]
        name = arm.removeprefix("pruned:")
        row = summary.estimators.get(name, {}) if arm.startswith("pruned:") else {}
        label = {"full": "nothing (full data)", "random": f"random {q}"}.get(
            arm, f"most harmful {q} by {name}")
        table.add_row(
            label,
            _mean_sd(loss, scale=1, digits=4),
            f"{np.mean(loss) - np.mean(random):+.4f}" if random and arm != "random" else "",
            _mean_sd(values["test_accuracy"]),
            _fmt(row.get("loo_pearson")),
            _fmt(row.get("loo_spearman")),
        )
    console.print(table)
    samples = int(next(iter(summary.estimators.values())).get("loo_samples", 0))
    if samples:
        console.print(f"LOO: {samples} pretraining samples removed one at a time, both stages "
                      "refit; correlation of score with the actual change of the target loss")
    console.print(
        f"\nnext:\n  sieve query --store {summary.store} --run {summary.run_id} "
        "\"select estimator, min(score), avg(score) from scores group by 1\"\n"
        f"  mlflow ui --backend-store-uri {Store(summary.store).mlflow_uri}   "
        f"(parent run {summary.mlflow_run_id})"
    )


def print_runs(store: Store) -> None:
    table = Table(title=f"runs in {store.root}")
    for column in ("run id", "status", "data", "model", "estimators", "stages done",
                   "best detection AUC"):
        table.add_column(column)
    for run in store.list_runs():
        config = load_yaml(run.config.read_text()) if run.config.exists() else {}
        metrics = read_metrics(run.metrics).to_pylist()
        order = ["train", "pretrain", "finetune", "gradients", "score", "prune", "retrain",
                 "groundtruth", "evaluate", "validate"]
        stages = sorted({m["stage"] for m in metrics},
                        key=lambda s: (order.index(s) if s in order else len(order), s))
        aucs = [m["value"] for m in metrics if m["name"] == "detection_auc"]
        table.add_row(
            run.run_id,
            run.status.read_text().strip() if run.status.exists() else "–",
            str(config.get("data", {}).get("path") or config.get("data", {}).get("name", "?")),
            str(config.get("model", {}).get("factory") or config.get("model", {}).get("name")),
            str(len(config.get("estimators", []))),
            ",".join(stages) or "–",
            f"{max(aucs):.3f}" if aucs else "–",
        )
    _console().print(table)
