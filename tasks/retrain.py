"""Stage 5: retrain from scratch without each removal (same recipe) and measure test accuracy."""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config
from tasks.plots import accuracy_comparison
from tasks.prune import Removal
from tasks.stage import stage
from tasks.workload import Workload, load_workload
from workloads.models import seeded_model
from workloads.training import accuracy, train


def train_without(work: Workload, removed: tuple[int, ...], seed: int) -> torch.nn.Module:
    """A model trained from scratch (same recipe, ``seed``: same initialization, data order and
    schedule) on the train split without the samples whose ids are in ``removed``."""
    torch.set_num_threads(1)
    rows = work.rows("train")
    keep = ~np.isin(work.samples.sample_id[rows], removed)
    model = seeded_model(work.factory, seed)
    train(model, work.x[rows], work.y[rows], work.recipe, seed, keep=keep)
    return model


@task(name="retrain-one", cache_policy=NO_CACHE)
def retrain_one(run: RunPaths, config: Config, removal: Removal) -> float:
    """Test accuracy (against clean labels) of a model trained without ``removal.removed``."""
    work = load_workload(run, config)
    model = train_without(work, removal.removed, removal.seed)
    test = work.rows("test")
    return accuracy(model, work.x[test], work.test_labels()[test])


@task(name="retrain", cache_policy=NO_CACHE)
def retrain_stage(
    run: RunPaths, config: Config, tracking: Tracking, removals: list[Removal]
) -> dict[str, list[float]]:
    """Every removal retrained (in parallel on the task runner): {arm: [accuracy per seed]}."""
    log = get_run_logger()
    arms: dict[str, list[float]] = defaultdict(list)
    with stage(run, tracking, "retrain") as rec:
        rec.params({"retrains": len(removals), "seeds": config.prune.seeds})
        started = time.perf_counter()
        futures = [retrain_one.submit(run, config, r) for r in removals]
        for i, (removal, future) in enumerate(zip(removals, futures, strict=True), 1):
            acc = future.result()
            arms[removal.arm].append(acc)
            rec.metric("test_accuracy", acc, estimator=removal.arm, seed=removal.seed)
            log.info("retrain: %d/%d (%s, seed %d) test accuracy %.4f, %.1f s elapsed", i,
                     len(removals), removal.arm, removal.seed, acc, time.perf_counter() - started)
        for arm, values in arms.items():
            rec.metric("test_accuracy_mean", float(np.mean(values)), estimator=arm)
            rec.metric("test_accuracy_sd", float(np.std(values)), estimator=arm)
        rec.artifact(accuracy_comparison(dict(arms), run.dir / "plots" / "accuracy.png"))
    return dict(arms)
