"""Stage 2: per-sample gradients, one Prefect task per shard, written to Parquet.

A shard is ``gradients/checkpoint=<c>/split=<s>/part-<k>.parquet`` holding rows
[k * shard_size, (k + 1) * shard_size) of that split. A shard already complete for the same
checkpoint file (matching model hash) is skipped, which is how ``--resume`` continues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from estimators.per_sample import parameter_count, parameter_order, per_sample_gradients
from estimators.projection import Projector
from estimators.registry import make_estimator
from storage.checkpoints import CheckpointRecord, load_state_dict
from storage.errors import BadInput
from storage.gradient_shards import ShardMeta, read_shard_meta, shard_path, write_gradient_shard
from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config
from tasks.stage import stage
from tasks.workload import load_workload


@dataclass(frozen=True)
class ShardJob:
    checkpoint: CheckpointRecord
    split: str
    part: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardResult:
    samples: int
    seconds: float
    computed: bool


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def needed_checkpoints(config: Config, records: list[CheckpointRecord]) -> list[CheckpointRecord]:
    """Checkpoints whose gradients some configured estimator reads (none, the final, or all)."""
    needs = [make_estimator(e.name, **e.options).needs for e in config.estimators]
    primary = [r for r in records if r.model == 0]
    if any(n.gradients and n.checkpoints == "all" for n in needs):
        return primary
    if any(n.gradients for n in needs):
        return primary[-1:]
    return []


def needed_splits(config: Config) -> list[str]:
    """Train, the summed target's split, and the test split when pairwise scores are asked."""
    splits = ["train", config.targets.split]
    if config.targets.pairwise and "test" not in splits:
        splits.append("test")
    return splits


def shard_jobs(config: Config, records: list[CheckpointRecord], split_sizes: dict[str, int]):
    size = config.gradients.shard_size
    return [
        ShardJob(record, split, part, start, min(start + size, split_sizes[split]))
        for record in needed_checkpoints(config, records)
        for split in needed_splits(config)
        for part, start in enumerate(range(0, split_sizes[split], size))
    ]


def _complete(path, record: CheckpointRecord, config: Config) -> bool:
    """A shard is complete when it exists for this checkpoint file and projection."""
    if not path.exists():
        return False
    try:
        meta = read_shard_meta(path)
    except BadInput:
        return False
    k = config.gradients.projection
    return meta.model_hash == record.sha256 and (
        meta.projection is None if k is None else meta.k == k
    )


@task(name="gradient-shard", cache_policy=NO_CACHE)
def gradient_shard(run: RunPaths, config: Config, job: ShardJob) -> ShardResult:
    """Compute and write one shard (float32 rows in the model's parameter order)."""
    path = shard_path(run.gradients_dir(job.checkpoint.checkpoint, job.split), job.part)
    if _complete(path, job.checkpoint, config):
        return ShardResult(job.stop - job.start, 0.0, computed=False)
    torch.set_num_threads(1)
    started = time.perf_counter()
    work = load_workload(run, config)
    rows = work.rows(job.split)[job.start : job.stop]
    model = work.factory()
    model.load_state_dict(load_state_dict(job.checkpoint.path, job.checkpoint.sha256))
    model = model.to(device()).eval()
    grads = per_sample_gradients(model, work.x[rows].to(device()), work.y[rows].to(device()))
    k = config.gradients.projection
    if k is not None:
        kind = config.gradients.projection_kind
        grads = Projector.for_model(model, k, seed=config.seed, kind=kind).project(grads)
    meta = ShardMeta(
        dtype="float32", projection=config.gradients.projection_kind if k else None,
        k=grads.shape[1], seed=config.seed if k else None,
        parameter_order=parameter_order(model), parameter_count=parameter_count(model),
        checkpoint=job.checkpoint.checkpoint, model_hash=job.checkpoint.sha256, split=job.split,
    )
    ids = work.samples.sample_id[rows].astype(np.int64)
    write_gradient_shard(path, ids, grads.to(torch.float32).cpu().contiguous(), meta)
    return ShardResult(len(rows), time.perf_counter() - started, computed=True)


@task(name="gradients", cache_policy=NO_CACHE)
def gradients_stage(
    run: RunPaths, config: Config, tracking: Tracking, records: list[CheckpointRecord]
) -> None:
    """Fan the shards out on the task runner and wait for all of them."""
    log = get_run_logger()
    work = load_workload(run, config)
    sizes = {s: len(work.rows(s)) for s in ("train", "val", "test")}
    jobs = shard_jobs(config, records, sizes)
    with stage(run, tracking, "gradients") as rec:
        rec.params({"shards": len(jobs), "shard_size": config.gradients.shard_size,
                    "checkpoints": len({j.checkpoint.checkpoint for j in jobs}),
                    "device": str(device()),
                    "projection": config.gradients.projection or "none"})
        started = time.perf_counter()
        futures = [gradient_shard.submit(run, config, job) for job in jobs]
        results: list[ShardResult] = []
        for i, future in enumerate(futures, 1):
            results.append(future.result())
            if i == len(futures) or i % max(1, len(futures) // 5) == 0:
                done = sum(r.samples for r in results)
                log.info("gradients: %d/%d shards, %d samples, %.0f samples/s", i, len(jobs),
                         done, done / (time.perf_counter() - started))
        computed = [r for r in results if r.computed]
        rec.metric("shards_computed", len(computed))
        rec.metric("shards_skipped", len(results) - len(computed))
        if computed:
            rate = sum(r.samples for r in computed) / (time.perf_counter() - started)
            rec.metric("gradients_per_second", rate)
