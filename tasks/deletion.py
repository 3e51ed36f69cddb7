"""Deletion prediction (``deletion.by: label | group``): how well scores predict the effect of
deleting a whole group of training samples (one class, or one protected group).

For each group S of the train split, predicted change of the target cost
``Delta_pred(S) = sum_{z in S} score(z) / n`` (the first-order, additive reading of the sign
convention ``score(z) ~ n [U(theta_-z) - U(theta)]``) against the actual
``Delta(S) = mean over seeds of U(theta_-S) - U(theta)`` from retraining without S (same seed:
same initialization and data order). U is the run's target (``targets.split`` and ``utility``).
Recorded per group (step = the group's label or group value) and, per estimator, the Pearson
and Spearman correlation across groups; estimators whose scale is not n-normalized (IP, TracIn)
are judged by the correlations only.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from scipy.stats import pearsonr, spearmanr

from storage.atomic import read_parquet_table
from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config
from tasks.prune import Removal
from tasks.retrain import retrain_one
from tasks.score import target_name
from tasks.stage import stage
from tasks.workload import load_workload


def deletion_groups(config: Config, run: RunPaths) -> dict[int, np.ndarray]:
    """{group value: train sample ids}, by label (as trained on) or protected group."""
    work = load_workload(run, config)
    train = work.rows("train")
    keys = (work.samples.label if config.deletion.by == "label" else work.samples.group)[train]
    ids = work.samples.sample_id[train]
    return {int(g): np.sort(ids[keys == g]) for g in np.unique(keys)}


@task(name="deletion", cache_policy=NO_CACHE)
def deletion_stage(
    run: RunPaths, config: Config, tracking: Tracking
) -> dict[str, dict[str, float]]:
    """Retrain without each group and compare with the scores' prediction; returns
    {estimator: {deletion_pearson, deletion_spearman}} (empty when ``deletion.by`` is unset)."""
    if config.deletion.by is None:
        return {}
    log = get_run_logger()
    groups = deletion_groups(config, run)
    n = sum(len(ids) for ids in groups.values())
    seeds = [config.seed + i for i in range(config.deletion.seeds)]
    removals = [Removal("full", s, ()) for s in seeds] + [
        Removal(f"delete:{g}", s, tuple(ids.tolist())) for g, ids in groups.items() for s in seeds
    ]
    summary: dict[str, dict[str, float]] = {}
    with stage(run, tracking, "deletion") as rec:
        rec.params({"by": config.deletion.by, "groups": len(groups), "seeds": len(seeds),
                    "target": target_name(config)})
        futures = [retrain_one.submit(run, config, r) for r in removals]
        cost: dict[str, list[float]] = defaultdict(list)
        for removal, future in zip(removals, futures, strict=True):
            cost[removal.arm].append(future.result()["target_cost"])
        log.info("deletion: %d retrains done (%d groups x %d seeds + full)", len(removals),
                 len(groups), len(seeds))
        full = np.asarray(cost["full"])
        actual = np.array([np.mean(np.asarray(cost[f"delete:{g}"]) - full) for g in groups])
        for g, value in zip(groups, actual, strict=True):
            rec.metric("deletion_actual", float(value), step=g)
        for spec in config.estimators:
            table = read_parquet_table(run.scores_dir(spec.name, target_name(config))
                                       / "part-0.parquet")
            score = dict(zip(table["sample_id"].to_pylist(), table["score"].to_pylist(),
                             strict=True))
            predicted = np.array([sum(score[i] for i in ids.tolist()) / n
                                  for ids in groups.values()])
            for g, value in zip(groups, predicted, strict=True):
                rec.metric("deletion_predicted", float(value), estimator=spec.name, step=g)
            row = _correlations(predicted, actual)
            for key, value in row.items():
                rec.metric(key, value, estimator=spec.name)
            summary[spec.name] = row
            log.info("deletion: %s predicted vs actual change of %s over %d groups: "
                     "Pearson %.3f, Spearman %.3f", spec.name, target_name(config), len(groups),
                     row["deletion_pearson"], row["deletion_spearman"])
    return summary


def _correlations(predicted: np.ndarray, actual: np.ndarray) -> dict[str, float]:
    if len(actual) < 3 or np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return {"deletion_pearson": float("nan"), "deletion_spearman": float("nan")}
    return {"deletion_pearson": float(pearsonr(predicted, actual).statistic),
            "deletion_spearman": float(spearmanr(predicted, actual).statistic)}
