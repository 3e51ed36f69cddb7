"""The ``report`` task: write the run's HTML report (presentation/html_report.py) at the end of a
flow and log it to the MLflow parent run. For 2-feature data it also evaluates the attributed
model on a grid, for the decision-boundary figure (the sanity check, configs/sanity.yaml)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from presentation.html_report import REPORT_FILE
from presentation.html_report import write_report as render_to_file
from presentation.report_figures import Boundary
from storage.atomic import read_parquet_schema
from storage.checkpoints import load_state_dict, read_checkpoint_index
from storage.store import RunPaths
from storage.tracking import Tracking, log_store_file
from storage.views import open_run
from tasks.config import Config, load_resolved_config
from tasks.score import target_name
from tasks.workload import factory_for
from workloads.datasets import read_samples

GRID = 160  # grid cells per axis of the decision-boundary figure

_HARMFUL_SQL = """
select estimator, sample_id from (
    select estimator, sample_id,
           row_number() over (partition by estimator order by score asc, sample_id asc) as r
    from scores where target = $target and isfinite(score))
where r <= $k order by estimator, r
"""


def write_report(run: RunPaths) -> Path:
    """Render ``run``'s report from the store with its resolved config; returns its path."""
    config = load_resolved_config(run.config)
    target = target_name(config)
    return render_to_file(run, config, target, boundary(run, config, target))


def boundary(run: RunPaths, config: Config, target: str) -> Boundary | None:
    """The decision-boundary figure's data when the samples have exactly 2 features (else
    None): the final model 0's predicted class on a GRID x GRID grid over the training points
    (padded by 10 %), and each estimator's k most harmful training samples, k = the number of
    mislabeled training samples (else ``prune.fraction`` of them)."""
    shape = (read_parquet_schema(run.samples).metadata or {}).get(b"input_shape", b"")
    if shape != b"2" or not run.checkpoint_index.exists():
        return None  # known from the file's metadata, without reading its rows
    samples = read_samples(run.samples)
    final = [r for r in read_checkpoint_index(run.checkpoints_dir) if r.model == 0][-1]
    model = factory_for(config, samples)()
    model.load_state_dict(load_state_dict(final.path))
    train = samples.indices("train")
    points = samples.x[train]
    low, high = points.min(0), points.max(0)
    pad = 0.1 * (high - low)
    gx = np.linspace(low[0] - pad[0], high[0] + pad[0], GRID)
    gy = np.linspace(low[1] - pad[1], high[1] + pad[1], GRID)
    cells = np.stack(np.meshgrid(gx, gy), axis=-1).reshape(-1, 2).astype(np.float32)
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(cells)).argmax(1).numpy().reshape(GRID, GRID)
    corrupted = (samples.corrupted[train] if samples.corrupted is not None
                 else np.zeros(len(train), dtype=bool))
    k = int(corrupted.sum()) or max(1, round(config.prune.fraction * len(train)))
    harmful: dict[str, list[int]] = {}
    with open_run(run) as con:
        rows = con.execute(_HARMFUL_SQL, {"target": target, "k": k}).fetchall()
    for estimator, sample_id in rows:
        harmful.setdefault(estimator, []).append(int(sample_id))
    order = [e.name for e in config.estimators if e.name in harmful]
    return Boundary(grid_x=gx, grid_y=gy, predicted=predicted, points=points,
                    labels=samples.label[train], corrupted=corrupted,
                    sample_ids=samples.sample_id[train],
                    harmful={e: np.asarray(harmful[e], dtype=np.int64) for e in order})


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
