"""The evaluation flow: attribute (train → gradients → scores, with train x test pairs), then
retrain to get ground truth (leave-one-out, LDS subsets, prune curve) and judge every
estimator against it."""

from __future__ import annotations

import torch
from prefect import flow

from flows.run_setup import tracked_run
from flows.runner import task_runner
from presentation.summaries import EvaluationSummary
from storage.store import Store
from tasks.config import Config
from tasks.evaluation import evaluation_stage, groundtruth_stage, plan_retrains
from tasks.gradients import gradients_stage
from tasks.report import report_stage
from tasks.score import score_stage
from tasks.train import prepare_samples, train_stage


def for_evaluation(config: Config) -> Config:
    """The config with train x test attributions on, over ``evaluate.lds.targets`` samples."""
    targets = config.targets.model_copy(
        update={"pairwise": True, "test_samples": config.evaluate.lds.targets}
    )
    return config.model_copy(update={"targets": targets})


@flow(name="sieve-evaluate", log_prints=True, task_runner=task_runner())
def evaluate(config: Config, store: str, run_id: str, resume: bool = False) -> EvaluationSummary:
    """Counterfactual evaluation of every configured estimator on this workload."""
    torch.set_num_threads(1)
    config = for_evaluation(config)
    the_store = Store(store)
    with tracked_run(config, the_store, run_id, resume) as (run, tracking):
        prepare_samples(run, config)
        checkpoints = train_stage(run, config, tracking)
        gradients_stage(run, config, tracking, checkpoints)
        scored = score_stage(run, config, tracking, checkpoints)
        plan = plan_retrains(run, config)
        outcomes = groundtruth_stage(run, config, tracking, str(the_store.root), plan)
        table = evaluation_stage(run, config, tracking, plan, outcomes, scored)
        report = report_stage(run, tracking)
    return EvaluationSummary(run_id, str(the_store.root), tracking.parent_run_id, table, report)
