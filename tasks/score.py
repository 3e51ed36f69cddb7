"""Stage 3: every configured estimator scores every training sample against the target.

Writes ``scores/estimator=<e>/target=<t>/part-0.parquet`` (sample_id, score, suspicion),
with ``targets.pairwise`` the train x test ``attributions/estimator=<e>/`` (``tasks.attributions``,
streamed block by block for estimators that stream: ``Estimator.streams_pairwise``) and, when
corruption is known, each estimator's noisy-label detection metrics.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import pyarrow as pa
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from estimators.base import Attribution, Checkpoint, Estimator, ScoringContext
from estimators.metrics import detection_auc, precision_at_k
from estimators.model_ensemble import ModelEnsemble
from presentation.plots import score_distributions
from storage.atomic import write_parquet_atomic
from storage.checkpoints import CheckpointRecord, load_state_dict
from storage.store import RunPaths
from storage.stored_gradients import StoredGradients
from storage.tracking import Tracking
from tasks.attributions import write_pairwise
from tasks.config import Config
from tasks.ensemble import scored_estimator
from tasks.member_pool import MemberJob, MemberPool, member_pool, parallel_members
from tasks.memory import peak_memory
from tasks.progress import StageProgress
from tasks.stage import stage
from tasks.utility import make_target, measurement, target_inputs, utility_split
from tasks.workload import load_workload
from workloads.inputs import take

SCORE_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("score", pa.float64()), ("suspicion", pa.float64())]
)


def target_name(config: Config) -> str:
    """The partition name of the target: ``<split>_<utility>`` (e.g. val_loss,
    val_demographic_parity)."""
    return f"{config.targets.split}_{config.targets.utility}"


def pairwise_targets(config: Config, test_ids: np.ndarray) -> np.ndarray:
    """The test sample ids attributed one by one: all, or a seeded subset (sorted)."""
    n = config.targets.test_samples
    if n is None or n >= len(test_ids):
        return np.sort(test_ids)
    return np.sort(np.random.default_rng([config.seed, 7]).choice(test_ids, n, replace=False))


def _checkpoint(r: CheckpointRecord) -> Checkpoint:
    return Checkpoint(r.checkpoint, r.step, r.lr,
                      load=lambda: load_state_dict(r.path, r.sha256), step_lr=r.step_lr)


def scoring_context(
    run: RunPaths, config: Config, records: list[CheckpointRecord], pairwise: bool = False
) -> ScoringContext:
    """What estimators read. ``pairwise``: the targets are single test samples instead of the
    summed ``targets.split`` loss."""
    work = load_workload(run, config)
    train = work.rows("train")
    if pairwise:
        test = work.rows("test")
        ids = pairwise_targets(config, work.samples.sample_id[test])
        target = test[np.isin(work.samples.sample_id[test], ids)]
        gradients = StoredGradients(run, "test", ids)
        target_x, cost = take(work.x, target), measurement(config)
    else:
        target = work.rows(config.targets.split)
        gradients = StoredGradients(run, utility_split(config))
        target_x = target_inputs(run, config, work, config.targets.split)
        cost = make_target(config, work, target)
    members = sorted({r.model for r in records} - {0})
    return ScoringContext(
        model_factory=work.attributed,
        checkpoints=[_checkpoint(r) for r in records if r.model == 0],
        train_ids=work.samples.sample_id[train],
        train_x=take(work.x, train),
        train_y=work.y[train],
        target_x=target_x,
        target_y=work.y[target],
        gradients=gradients,
        weight_decay=config.train.weight_decay,
        seed=config.seed,
        target_ids=work.samples.sample_id[target],
        batch_size=config.train.batch_size,
        extra_models=[[_checkpoint(r) for r in records if r.model == m] for m in members],
        target=cost,
    )


def supports_pairwise(estimator: Estimator) -> bool:
    inner = estimator.base if isinstance(estimator, ModelEnsemble) else estimator
    return type(inner).pairwise is not Estimator.pairwise


@task(name="score", cache_policy=NO_CACHE)
def score_one(
    run: RunPaths, config: Config, records: list[CheckpointRecord], name: str,
    pool: MemberPool | None = None,
) -> tuple[Attribution, float, float, float | None]:
    """Run estimator ``name`` and write its scores (and, when asked and supported, its
    train x test attributions); returns (attribution, seconds and peak MiB above the start,
    both for the summed target, and the seconds of the train x test attributions, None when
    not written). ``pool``: worker processes that score ensemble members beside this one."""
    torch.set_num_threads(1)
    runner = (partial(pool.runner, MemberJob(run, config, records, name))
              if pool is not None else None)
    estimator = scored_estimator(config, name, runner)  # averaged over train.models when > 1
    started = time.perf_counter()
    with peak_memory() as memory:
        attribution = estimator.score(scoring_context(run, config, records))
    seconds = time.perf_counter() - started
    suspicion = attribution.suspicion
    table = pa.table(
        {
            "sample_id": attribution.sample_ids.astype(np.int64),
            "score": attribution.score.astype(np.float64),
            "suspicion": (suspicion.astype(np.float64) if suspicion is not None
                          else np.full(len(attribution.score), np.nan)),
        },
        schema=SCORE_SCHEMA,
    )
    write_parquet_atomic(table, run.scores_dir(name, target_name(config)) / "part-0.parquet")
    pairwise_seconds = None
    if config.targets.pairwise and supports_pairwise(estimator):
        started = time.perf_counter()
        ctx = scoring_context(run, config, records, pairwise=True)
        parts = write_pairwise(run.attributions_dir(name), estimator, ctx)
        pairwise_seconds = time.perf_counter() - started
        how = "streamed block by block" if estimator.streams_pairwise() else "whole matrix"
        get_run_logger().info(
            "score: %s train x test attributions written, %d part(s) (%s) in %.2f s",
            name, parts, how, pairwise_seconds)
    return attribution, seconds, memory.delta_mb, pairwise_seconds


@task(name="scores", cache_policy=NO_CACHE)
def score_stage(
    run: RunPaths, config: Config, tracking: Tracking, records: list[CheckpointRecord]
) -> dict[str, dict[str, float]]:
    """Score with every estimator; returns {estimator: {metric: value}} for the run table."""
    log = get_run_logger()
    work = load_workload(run, config)
    corrupted = work.samples.corrupted
    summary: dict[str, dict[str, float]] = {}
    with stage(run, tracking, "score") as rec, member_pool(config) as pool:
        rec.params({"estimators": ",".join(e.name for e in config.estimators),
                    "target": target_name(config),
                    "models_in_parallel": parallel_members(config)})
        attributions = {}
        scored = StageProgress("score", len(config.estimators), "estimators", log)
        for spec in config.estimators:
            attribution, seconds, peak_mb, pairwise = score_one(run, config, records,
                                                                spec.name, pool)
            attributions[spec.name] = attribution
            row = {"seconds": seconds, "peak_mb": peak_mb}
            rec.metric("seconds", seconds, estimator=spec.name)
            rec.metric("peak_mb", peak_mb, estimator=spec.name)
            if pairwise is not None:
                row["pairwise_seconds"] = pairwise
                rec.metric("pairwise_seconds", pairwise, estimator=spec.name)
            if corrupted is not None and corrupted.any():
                row |= _detection(attribution, corrupted, work.samples.sample_id)
                for key, value in row.items():
                    if key not in ("seconds", "peak_mb", "pairwise_seconds"):
                        rec.metric(key, value, estimator=spec.name)
            summary[spec.name] = row
            scored.advance(note=f"{spec.name} in {seconds:.2f} s")
        if corrupted is not None and corrupted.any():
            path = run.dir / "plots" / "score_distributions.png"
            score_distributions(attributions, _corrupted_of(corrupted, work.samples.sample_id),
                                path)
            rec.artifact(path)
    return summary


def _corrupted_of(corrupted: np.ndarray, sample_id: np.ndarray) -> dict[int, bool]:
    return dict(zip(sample_id.tolist(), corrupted.tolist(), strict=True))


def _detection(a: Attribution, corrupted: np.ndarray, sample_id: np.ndarray) -> dict[str, float]:
    """Noisy-label detection: AUC of -score (most harmful first) and of suspicion."""
    lookup = _corrupted_of(corrupted, sample_id)
    truth = np.array([lookup[int(i)] for i in a.sample_ids])
    out = {"detection_auc": detection_auc(-a.score, truth),
           "precision_at_k": precision_at_k(-a.score, truth, int(truth.sum()))}
    if a.suspicion is not None:
        out["suspicion_auc"] = detection_auc(a.suspicion, truth)
    return out
