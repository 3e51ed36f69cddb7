"""A pipeline stage's record: one MLflow child run plus its rows in metrics.parquet."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from storage.metrics import record_metrics
from storage.store import RunPaths
from storage.tracking import StageRun, Tracking
from tasks.interrupts import interruption, raise_swallowed, release_frames


class StageRecord:
    """Collects a stage's metrics; each goes to MLflow (key ``name[.estimator][.seed]``)
    and to metrics.parquet (stage, name, value, estimator, seed, step)."""

    def __init__(self, name: str, mlflow_run: StageRun) -> None:
        self.name = name
        self.mlflow = mlflow_run
        self.rows: list[dict[str, Any]] = []

    def metric(
        self,
        name: str,
        value: float,
        estimator: str | None = None,
        seed: int | None = None,
        step: int | None = None,
    ) -> None:
        self.rows.append({"name": name, "value": value, "estimator": estimator, "seed": seed,
                          "step": step})
        key = ".".join([name] + ([estimator] if estimator else []) +
                       ([f"seed{seed}"] if seed is not None else []))
        self.mlflow.metric(key, value, step or 0)

    def params(self, values: dict[str, Any]) -> None:
        self.mlflow.params(values)

    def artifact(self, path: Path) -> None:
        self.mlflow.artifact(path)


@contextmanager
def stage(run: RunPaths, tracking: Tracking, name: str) -> Iterator[StageRecord]:
    """Open the MLflow child run ``name``; on success record ``seconds``, end it FINISHED, then
    write the metrics (last: a stage is done once its rows are in metrics.parquet, and its
    MLflow run is then already closed). An interruption ends it KILLED (its cut-short frames
    released first: ``release_frames``), an error FAILED."""
    raise_swallowed()
    record = StageRecord(name, tracking.start_stage(name))
    started = time.perf_counter()
    try:
        yield record
        record.metric("seconds", time.perf_counter() - started)
    except BaseException as exc:
        interrupted = interruption(exc) is not None
        if interrupted:
            release_frames(exc)
        with contextlib.suppress(Exception):  # e.g. a full disk: report the stage's own error
            record.mlflow.end("KILLED" if interrupted else "FAILED")
        raise
    record.mlflow.end("FINISHED")
    record_metrics(run.metrics, name, record.rows)
