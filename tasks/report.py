"""The ``report`` task: write the run's HTML report (presentation/html_report.py) at the end of a
flow and log it to the MLflow parent run."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from presentation.html_report import REPORT_FILE
from presentation.html_report import write_report as render_to_file
from storage.store import RunPaths
from storage.tracking import Tracking, log_store_file
from tasks.config import load_resolved_config
from tasks.score import target_name


def write_report(run: RunPaths) -> Path:
    """Render ``run``'s report from the store with its resolved config; returns its path."""
    config = load_resolved_config(run.config)
    return render_to_file(run, config, target_name(config))


@task(name="report", cache_policy=NO_CACHE)
def report_stage(run: RunPaths, tracking: Tracking) -> str:
    """Write report.html and log it to the MLflow parent run; returns the file's path."""
    log = get_run_logger()
    started = time.perf_counter()
    path = write_report(run)
    log_store_file(tracking.client(), tracking.parent_run_id, path)
    log.info("report: %s (%.0f KiB) in %.1f s, MLflow artifact %s of run %s", path.as_uri(),
             path.stat().st_size / 1024, time.perf_counter() - started, REPORT_FILE,
             tracking.parent_run_id)
    return str(path)
