"""The main flow: train → gradients → scores → prune → retrain, tracked in MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from prefect import flow, get_run_logger

from storage.atomic import write_text_atomic
from storage.store import RunPaths, Store
from storage.tracking import finish_tracking, start_tracking, tag_run
from tasks.config import Config, config_yaml
from tasks.gradients import gradients_stage
from tasks.prune import prune_stage
from tasks.retrain import retrain_stage
from tasks.score import score_stage
from tasks.train import prepare_samples, train_stage


@dataclass
class RunSummary:
    """What ``sieve run`` prints: per-estimator metrics and retrained accuracies per arm."""

    run_id: str
    store: str
    mlflow_run_id: str
    estimators: dict[str, dict[str, float]] = field(default_factory=dict)
    accuracy: dict[str, list[float]] = field(default_factory=dict)


def _mlflow_id_file(run: RunPaths):
    return run.dir / "mlflow_run_id"


@flow(name="sieve-pipeline", log_prints=True)
def pipeline(config: Config, store: str, run_id: str, resume: bool = False) -> RunSummary:
    """Find, then remove, the training samples that hurt the model; compare retrained accuracy.

    ``resume`` continues run ``run_id`` (complete shards, checkpoints and samples are reused).
    """
    torch.set_num_threads(1)
    log = get_run_logger()
    the_store = Store(store)
    run = the_store.run(run_id)
    run.dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_text_atomic(config_yaml(config), run.config)
    previous = _mlflow_id_file(run).read_text().strip() if resume and \
        _mlflow_id_file(run).exists() else None
    tracking = start_tracking(the_store, config.tracking.uri, config.tracking.experiment,
                              run_id, previous)
    write_text_atomic(tracking.parent_run_id, _mlflow_id_file(run))
    tracking.client().log_artifact(tracking.parent_run_id, str(run.config))
    log.info("run %s in %s (MLflow run %s)", run_id, the_store.root, tracking.parent_run_id)
    ok = False
    try:
        prepare_samples(run, config)
        checkpoints = train_stage(run, config, tracking)
        gradients_stage(run, config, tracking, checkpoints)
        estimators = score_stage(run, config, tracking, checkpoints)
        removals = prune_stage(run, config, tracking)
        accuracy = retrain_stage(run, config, tracking, removals)
        ok = True
    finally:
        finish_tracking(tracking, ok)
    tag_run(tracking, {"sieve.status": "complete"})
    return RunSummary(run_id, str(the_store.root), tracking.parent_run_id, estimators, accuracy)
