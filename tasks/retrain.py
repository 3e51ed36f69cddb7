"""Stage 5: retrain from scratch without each removal (same recipe) and measure test accuracy."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from estimators.metrics import sample_sd
from presentation.plots import accuracy_comparison
from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config
from tasks.progress import StageProgress
from tasks.prune import Removal
from tasks.stage import stage
from tasks.utility import model_metrics
from tasks.workload import Workload, load_workload
from workloads.inputs import take
from workloads.models import seeded_model
from workloads.training import train


def train_without(work: Workload, removed: tuple[int, ...], seed: int) -> torch.nn.Module:
    """A model trained from scratch (same recipe, ``seed``: same initialization, data order and
    schedule) on the train split without the samples whose ids are in ``removed``."""
    torch.set_num_threads(1)
    rows = work.rows("train")
    keep = ~np.isin(work.samples.sample_id[rows], removed)
    model = seeded_model(work.factory, seed)
    train(model, take(work.x, rows), work.y[rows], work.recipe, seed, keep=keep,
          loss_fn=work.loss)
    return model


@task(name="retrain-one", cache_policy=NO_CACHE)
def retrain_one(run: RunPaths, config: Config, removal: Removal) -> dict[str, float]:
    """Metrics of a model trained without ``removal.removed`` (``tasks.utility.model_metrics``:
    test accuracy against clean labels, and the utility's gaps or robust accuracy)."""
    work = load_workload(run, config)
    model = train_without(work, removal.removed, removal.seed)
    return model_metrics(run, config, work, model)


@task(name="retrain", cache_policy=NO_CACHE)
def retrain_stage(
    run: RunPaths, config: Config, tracking: Tracking, removals: list[Removal]
) -> dict[str, list[float]]:
    """Every removal retrained (in parallel on the task runner): {arm: [accuracy per seed]}."""
    log = get_run_logger()
    arms: dict[str, list[float]] = defaultdict(list)
    others: dict[tuple[str, str], list[float]] = defaultdict(list)
    with stage(run, tracking, "retrain") as rec:
        rec.params({"retrains": len(removals), "seeds": config.prune.seeds})
        futures = [retrain_one.submit(run, config, r) for r in removals]
        retrains = StageProgress("retrain", len(removals), "retrains", log)
        for removal, future in zip(removals, futures, strict=True):
            metrics = future.result()
            acc = metrics.pop("test_accuracy")
            arms[removal.arm].append(acc)
            rec.metric("test_accuracy", acc, estimator=removal.arm, seed=removal.seed)
            for name, value in metrics.items():
                others[(removal.arm, name)].append(value)
                rec.metric(name, value, estimator=removal.arm, seed=removal.seed)
            retrains.advance(note=f"{removal.arm}, seed {removal.seed}: test accuracy {acc:.4f}")
        for arm, values in arms.items():
            rec.metric("test_accuracy_mean", float(np.mean(values)), estimator=arm)
            if len(values) > 1:  # the sample sd of one seed is undefined
                rec.metric("test_accuracy_sd", sample_sd(values), estimator=arm)
        for (arm, name), values in others.items():
            rec.metric(f"{name}_mean", float(np.mean(values)), estimator=arm)
            if len(values) > 1:
                rec.metric(f"{name}_sd", sample_sd(values), estimator=arm)
        rec.artifact(accuracy_comparison(dict(arms), run.dir / "plots" / "accuracy.png"))
    return dict(arms)
