"""Stage 3: every configured estimator scores every training sample against the target.

Writes ``scores/estimator=<e>/target=<t>/part-0.parquet`` (sample_id, score, suspicion) and,
when corruption is known, each estimator's noisy-label detection metrics.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from estimators.base import Attribution, Checkpoint, ScoringContext
from estimators.metrics import detection_auc, precision_at_k
from estimators.registry import make_estimator
from storage.atomic import write_parquet_atomic
from storage.checkpoints import CheckpointRecord, load_state_dict
from storage.errors import BadInput
from storage.gradient_shards import complete_shards, read_gradient_shard
from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config
from tasks.plots import score_distributions
from tasks.stage import stage
from tasks.workload import load_workload

SCORE_SCHEMA = pa.schema(
    [("sample_id", pa.int64()), ("score", pa.float64()), ("suspicion", pa.float64())]
)


def target_name(config: Config) -> str:
    """The partition name of the summed-loss target over the configured split."""
    return f"{config.targets.split}_loss"


class StoredGradients:
    """The ``GradientSource`` over a run's gradient shards, read shard by shard."""

    def __init__(self, run: RunPaths, target_split: str) -> None:
        self.run = run
        self.target_split = target_split

    def _shards(self, checkpoint: int, split: str) -> list[Path]:
        shards = complete_shards(self.run.gradients_dir(checkpoint, split))
        if not shards:
            raise BadInput(f"no gradient shards for checkpoint {checkpoint}, split {split}")
        return shards

    def train_shards(self, checkpoint: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        for path in self._shards(checkpoint, "train"):
            yield read_gradient_shard(path)

    def target(self, checkpoint: int) -> torch.Tensor:
        total = None
        for path in self._shards(checkpoint, self.target_split):
            part = read_gradient_shard(path)[1].to(torch.float64).sum(0)
            total = part if total is None else total + part
        return total


def scoring_context(run: RunPaths, config: Config, records: list[CheckpointRecord]):
    work = load_workload(run, config)
    train, target = work.rows("train"), work.rows(config.targets.split)
    checkpoints = [
        Checkpoint(r.checkpoint, r.step, r.lr,
                   load=lambda r=r: load_state_dict(r.path, r.sha256))
        for r in records
    ]
    return ScoringContext(
        model_factory=work.factory,
        checkpoints=checkpoints,
        train_ids=work.samples.sample_id[train],
        train_x=work.x[train],
        train_y=work.y[train],
        target_x=work.x[work.rows(config.targets.split)],
        target_y=work.y[target],
        gradients=StoredGradients(run, config.targets.split),
        weight_decay=config.train.weight_decay,
        seed=config.seed,
    )


@task(name="score", cache_policy=NO_CACHE)
def score_one(
    run: RunPaths, config: Config, records: list[CheckpointRecord], name: str
) -> tuple[Attribution, float]:
    """Run estimator ``name``, write its scores Parquet; returns (attribution, seconds)."""
    torch.set_num_threads(1)
    spec = config.estimator(name)
    started = time.perf_counter()
    attribution = make_estimator(name, **spec.options).score(
        scoring_context(run, config, records)
    )
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
    return attribution, seconds


@task(name="scores", cache_policy=NO_CACHE)
def score_stage(
    run: RunPaths, config: Config, tracking: Tracking, records: list[CheckpointRecord]
) -> dict[str, dict[str, float]]:
    """Score with every estimator; returns {estimator: {metric: value}} for the run table."""
    log = get_run_logger()
    work = load_workload(run, config)
    corrupted = work.samples.corrupted
    summary: dict[str, dict[str, float]] = {}
    with stage(run, tracking, "score") as rec:
        rec.params({"estimators": ",".join(e.name for e in config.estimators),
                    "target": target_name(config)})
        attributions = {}
        for i, spec in enumerate(config.estimators, 1):
            attribution, seconds = score_one(run, config, records, spec.name)
            attributions[spec.name] = attribution
            row = {"seconds": seconds}
            rec.metric("seconds", seconds, estimator=spec.name)
            if corrupted is not None and corrupted.any():
                row |= _detection(attribution, corrupted, work.samples.sample_id)
                for key, value in row.items():
                    if key != "seconds":
                        rec.metric(key, value, estimator=spec.name)
            summary[spec.name] = row
            log.info("score: %d/%d %s in %.2f s", i, len(config.estimators), spec.name, seconds)
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
