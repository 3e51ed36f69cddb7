"""Stage 2: per-sample gradients, one Prefect task per shard, written to Parquet.

A shard is ``gradients/checkpoint=<c>/split=<s>/part-<k>.parquet`` holding rows
[k * shard_size, (k + 1) * shard_size) of that split. A shard already complete for the same
checkpoint file (matching model hash) is skipped, which is how ``--resume`` continues.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from estimators.factorized import FactorizedProjector, make_projector, rows_of_cost
from estimators.per_sample import (
    RowCost,
    parameter_count,
    parameter_order,
    per_sample_gradients,
)
from estimators.projection import Projector
from estimators.registry import make_estimator
from storage.checkpoints import CheckpointRecord, load_state_dict
from storage.errors import BadInput
from storage.gradient_shards import (
    ShardMeta,
    read_gradient_shard,
    read_shard_meta,
    shard_path,
    write_gradient_shard,
)
from storage.store import RunPaths
from storage.tracking import Tracking
from tasks.config import Config
from tasks.progress import StageProgress
from tasks.stage import stage
from tasks.utility import row_cost, utility_gradient_rows, utility_row_count, utility_split
from tasks.workload import load_workload
from workloads.datasets import SPLITS
from workloads.inputs import Inputs, take, to_device


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
    worker: str = ""
    """``host:pid`` of the process that ran the shard task."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def device() -> torch.device:
    """This worker's device: the CPU, or one GPU per worker (a Dask worker named ``i`` takes GPU
    ``i mod count``; a thread or Ray worker the first visible one)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", _worker_index() % torch.cuda.device_count())


def _worker_index() -> int:
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    return name if isinstance(name, int) else 0


def _placement(config: Config) -> contextlib.AbstractContextManager:
    """Ray: ask for ``ray.gpus_per_shard`` GPUs per shard task (Ray hides GPUs from tasks that
    don't ask); other runners: nothing to ask."""
    if config.runner != "ray" or not config.ray.gpus_per_shard:
        return contextlib.nullcontext()
    from prefect_ray.context import remote_options

    return remote_options(num_gpus=config.ray.gpus_per_shard)


def chunk_rows(parameters: int, memory_mb: int) -> int:
    """Rows whose per-sample gradients (and their float64 projection input) fit in
    ``memory_mb``: a multiple of 256 when at least 256 fit (so the row slices the gradient
    routine works in, and hence the float rounding, don't depend on the budget)."""
    rows = max(1, memory_mb * 2**20 // (parameters * 12))
    return rows // 256 * 256 if rows >= 256 else rows


def shard_gradients(model: torch.nn.Module, x: Inputs, y: torch.Tensor,
                    projector: Projector | FactorizedProjector | None, rows: int,
                    cost: RowCost | None = None, first_row: int = 0) -> torch.Tensor:
    """Per-sample gradients of ``cost`` (default cross-entropy) of ``model`` on (x, y),
    projected when ``projector`` is given, ``rows`` at a time (the memory bound, on any
    device): (m, k or d) float32 on the CPU. A factorized projector computes its features from
    hooks (no (rows, d) tensor). ``first_row``: the split index of row 0 (the projectors align
    their blocks to it)."""
    if isinstance(projector, FactorizedProjector):
        features = projector.features(model, x, y, cost=rows_of_cost(cost), first_row=first_row)
        return features.to(device="cpu", dtype=torch.float32)
    blocks = []
    for start in range(0, y.shape[0], rows):
        grads = per_sample_gradients(model, take(x, slice(start, start + rows)),
                                     y[start : start + rows], chunk_size=min(rows, 256),
                                     cost=cost)
        if projector is not None:
            grads = projector.project(grads, first_row=first_row + start)
        blocks.append(grads.to(device="cpu", dtype=torch.float32))
    return torch.cat(blocks)


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
    """Train, the target's split (or its utility pseudo split, ``tasks.utility``), and the test
    split when pairwise scores are asked."""
    splits = ["train", utility_split(config)]
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
    """A shard is complete when it exists for this checkpoint file and projection and passes
    its checksum (a damaged one is reported in one log line and recomputed)."""
    if not path.exists():
        return False
    try:
        read_gradient_shard(path)  # verifies the checksum over metadata, ids and gradients
        meta = read_shard_meta(path)
    except BadInput as exc:
        get_run_logger().warning("gradients: %s; recomputing it", exc)
        return False
    spec = config.gradients.projection_spec
    return meta.model_hash == record.sha256 and meta.dtype == config.gradients.dtype and (
        meta.projection is None if spec is None
        else meta.projection == spec.label and (spec.k is None or meta.k == spec.k)
    )


@task(name="gradient-shard", cache_policy=NO_CACHE)
def gradient_shard(run: RunPaths, config: Config, job: ShardJob) -> ShardResult:
    """Compute and write one shard (rows in the model's parameter order, stored as
    ``gradients.dtype``)."""
    path = shard_path(run.gradients_dir(job.checkpoint.checkpoint, job.split), job.part)
    if _complete(path, job.checkpoint, config):
        return ShardResult(job.stop - job.start, 0.0, computed=False)
    torch.set_num_threads(1)
    started = time.perf_counter()
    work = load_workload(run, config)
    model = work.attributed()
    model.load_state_dict(load_state_dict(job.checkpoint.path, job.checkpoint.sha256))
    model = model.to(device()).eval()
    spec = config.gradients.projection_spec
    projector = make_projector(model, spec, config.seed) if spec is not None else None
    if job.split in SPLITS:
        rows = work.rows(job.split)[job.start : job.stop]
        ids = work.samples.sample_id[rows].astype(np.int64)
        grads = shard_gradients(model, to_device(take(work.x, rows), device()),
                                work.y[rows].to(device()),
                                projector, chunk_rows(parameter_count(model),
                                                      config.gradients.memory_mb),
                                row_cost(config, job.split), job.start)
    else:
        ids, grads = utility_gradient_rows(run, config, work, model, job.start, job.stop,
                                           device())
        if projector is not None:
            grads = projector.project(grads, first_row=job.start)
    meta = ShardMeta(
        dtype=config.gradients.dtype, projection=spec.label if spec else None,
        k=grads.shape[1], seed=config.seed if spec else None,
        parameter_order=parameter_order(model), parameter_count=parameter_count(model),
        checkpoint=job.checkpoint.checkpoint, model_hash=job.checkpoint.sha256, split=job.split,
    )
    write_gradient_shard(path, ids, grads, meta)
    get_run_logger().info("gradient shard %s part %d (checkpoint %d): %d samples on %s (%s)",
                          job.split, job.part, job.checkpoint.checkpoint, len(ids),
                          worker_name(), device())
    return ShardResult(len(ids), time.perf_counter() - started, computed=True,
                       worker=worker_name())


@task(name="gradients", cache_policy=NO_CACHE)
def gradients_stage(
    run: RunPaths, config: Config, tracking: Tracking, records: list[CheckpointRecord]
) -> None:
    """Fan the shards out on the task runner and wait for all of them."""
    log = get_run_logger()
    work = load_workload(run, config)
    sizes = {s: len(work.rows(s)) for s in SPLITS}
    sizes[utility_split(config)] = utility_row_count(config, work)
    jobs = shard_jobs(config, records, sizes)
    with stage(run, tracking, "gradients") as rec:
        rec.params({"shards": len(jobs), "shard_size": config.gradients.shard_size,
                    "checkpoints": len({j.checkpoint.checkpoint for j in jobs}),
                    "device": str(device()),
                    "projection": _projection_label(config)})
        started = time.perf_counter()
        with _placement(config):
            futures = [gradient_shard.submit(run, config, job) for job in jobs]
        samples = StageProgress("gradients", sum(j.stop - j.start for j in jobs), "samples", log)
        results: list[ShardResult] = []
        for i, future in enumerate(futures, 1):
            results.append(future.result())
            skipped = sum(not r.computed for r in results)
            samples.advance(results[-1].samples,
                            note=f"{i}/{len(jobs)} shards, {skipped} already complete")
        computed = [r for r in results if r.computed]
        rec.metric("shards_computed", len(computed))
        workers = Counter(r.worker for r in computed)
        if workers:
            rec.params({"workers": ", ".join(f"{w} ({n} shards)" for w, n in workers.items())})
            log.info("gradients: shards ran on %d worker(s): %s", len(workers), dict(workers))
        rec.metric("shards_skipped", len(results) - len(computed))
        if computed:
            rate = sum(r.samples for r in computed) / (time.perf_counter() - started)
            rec.metric("gradients_per_second", rate)


def _projection_label(config: Config) -> str:
    spec = config.gradients.projection_spec
    if spec is None:
        return "none"
    if spec.kind == "factorized":
        return f"factorized {spec.k_in}x{spec.k_out}"
    return f"{spec.kind} {spec.k}"
