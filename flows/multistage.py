"""The multistage flow: pretrain on task A → finetune on task B → score the pretraining samples
by their influence on the finetuned model's target loss → prune them, re-pretrain and
re-finetune (against random removal and the pretraining-loss baseline) → validate the scores
against leave-one-out refits. Tracked in MLflow like the main flow (parent + stage runs)."""

from __future__ import annotations

import torch
from prefect import flow

from flows.run_setup import tracked_run
from flows.runner import task_runner
from presentation.summaries import MultistageSummary
from storage.store import Store
from tasks.config import Config
from tasks.multistage import (
    prepare_two_stage_samples,
    prune_pretraining,
    retrain_two_stages,
    score_pretraining,
    train_two_stages,
    validate_multistage,
)


@flow(name="sieve-multistage", log_prints=True, task_runner=task_runner())
def multistage(config: Config, store: str, run_id: str, resume: bool = False) -> MultistageSummary:
    """Which pretraining samples help or hurt the finetuned model, and what removing them does.

    ``resume`` continues run ``run_id`` (samples and the two checkpoints are reused).
    """
    torch.set_num_threads(1)
    with tracked_run(config, Store(store), run_id, resume) as (run, tracking):
        prepare_two_stage_samples(run, config)
        checkpoints = train_two_stages(run, config, tracking)
        estimators = score_pretraining(run, config, tracking, checkpoints)
        removals = prune_pretraining(run, config, tracking)
        arms = retrain_two_stages(run, config, tracking, removals)
        if config.multistage.validation.samples:
            for name, row in validate_multistage(run, config, tracking, checkpoints).items():
                estimators[name] |= row
    return MultistageSummary(run_id, str(Store(store).root), tracking.parent_run_id, estimators,
                             arms)
