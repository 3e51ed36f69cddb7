"""The main flow: train → gradients → scores → prune → retrain, tracked in MLflow."""

from __future__ import annotations

import torch
from prefect import flow

from flows.run_setup import tracked_run
from flows.runner import task_runner
from presentation.summaries import RunSummary
from storage.store import Store
from tasks.confidence import confidence_stage
from tasks.config import Config
from tasks.deletion import deletion_stage
from tasks.gradients import gradients_stage
from tasks.prune import prune_stage
from tasks.report import report_stage
from tasks.retrain import retrain_stage
from tasks.score import score_stage
from tasks.train import prepare_samples, train_stage
from tasks.utility import attack_stage


@flow(name="sieve-pipeline", log_prints=True, task_runner=task_runner())
def pipeline(config: Config, store: str, run_id: str, resume: bool = False) -> RunSummary:
    """Find, then remove, the training samples that hurt the model; compare retrained accuracy.

    ``resume`` continues run ``run_id`` (complete shards, checkpoints and samples are reused).
    """
    torch.set_num_threads(1)
    with tracked_run(config, Store(store), run_id, resume) as (run, tracking):
        prepare_samples(run, config)
        checkpoints = train_stage(run, config, tracking)
        attack_stage(run, config, tracking, checkpoints)
        gradients_stage(run, config, tracking, checkpoints)
        estimators = score_stage(run, config, tracking, checkpoints)
        removals = prune_stage(run, config, tracking)
        accuracy = retrain_stage(run, config, tracking, removals)
        for name, row in deletion_stage(run, config, tracking).items():
            estimators[name] |= row
        confidence = confidence_stage(run, config, tracking, accuracy)
        report = report_stage(run, tracking)
    return RunSummary(run_id, str(Store(store).root), tracking.parent_run_id, estimators,
                      accuracy, report, confidence)
